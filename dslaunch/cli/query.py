"""`dslaunch query`: one request to the job's front, printed for a person (or as JSON)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from dslaunch.cli import render
from dslaunch.cli.app import console, main
from dslaunch.cli.options import QUERY_TIMEOUT_DEFAULT, name_option
from dslaunch.errors import UserError
from dslaunch.launch import store as state


@main.command()
@click.argument("prompts", nargs=-1)
@name_option
@click.option("--max-new-tokens", "-k", type=int, default=None, help="Tokens to generate (front default: 32).")
@click.option("--temperature", "-t", type=float, default=None, help="0 (default) is greedy; above 0 samples.")
@click.option("--top-p", type=float, default=None, help="Nucleus sampling mass.")
@click.option("--top-k", type=int, default=None, help="Sample among the k likeliest tokens.")
@click.option("--seed", type=int, default=None, help="Seed for sampling (same seed, same text).")
@click.option("--stop", multiple=True, help="Stop before this string (repeatable).")
@click.option("--presence-penalty", type=float, default=None, help="Minus this for a token already generated.")
@click.option("--frequency-penalty", type=float, default=None, help="Minus this per time a token was generated.")
@click.option("--repetition-penalty", type=float, default=None, help="Divide a seen token's logit by this (1: none).")
@click.option("--logit-bias", multiple=True, metavar="TOKEN=BIAS", help="Add BIAS (-100 to 100) to token id TOKEN.")
@click.option("--min-tokens", type=int, default=None, help="Generate at least this many tokens before an end.")
@click.option("--ignore-eos", is_flag=True, default=None, help="Go on past end-of-sequence tokens.")
@click.option("--logprobs", type=int, default=None, help="Each token's log probability, and this many alternatives.")
@click.option("--schema", default=None, metavar="JSON|@FILE", help="Answer in JSON valid against this JSON schema.")
@click.option("--stream", "-s", is_flag=True, help="Print text as it is generated.")
@click.option("--embed", is_flag=True, help="Embed the texts instead (jobs started with --task embed).")
@click.option("--infer", "infer_json", default=None, metavar="JSON", help="Send this input to a --handler job.")
@click.option("--health", is_flag=True, help="Ask the front how the job is; with --deep, through every rank.")
@click.option("--deep", is_flag=True, help="With --health: a one-token forward on every rank.")
@click.option("--stats", "want_stats", is_flag=True, help="Requests served, queue, batch sizes, latency.")
@click.option("--json", "as_json", is_flag=True, help="Print the front's answer as JSON.")
@click.option("--router", type=int, default=None, help="Ask this router only (0, 1, ...). Default: fail over.")
@click.option(
    "--timeout", type=float, default=QUERY_TIMEOUT_DEFAULT, show_default=True, help="Seconds to wait for the answer."
)
def query(prompts: tuple[str, ...], name: str, max_new_tokens: int | None, temperature: float | None,
          top_p: float | None, top_k: int | None, seed: int | None, stop: tuple[str, ...], stream: bool,
          embed: bool, infer_json: str | None, health: bool, deep: bool, want_stats: bool, as_json: bool,
          router: int | None, timeout: float, **penalties: Any) -> None:  # fmt: skip
    """Send prompts (or texts, or a health check) to the job's front and print the answer.

    The routers are found from the job record (a request that got no answer goes to the next
    router); when one listens on a remote node's loopback, the request goes through an SSH
    tunnel. A PROMPT of '-' reads standard input.

    \b
    Examples:
      dslaunch query "The quick brown fox"
      dslaunch query -k 64 --stream "Once upon a time"
      dslaunch query "a" "b" --json                   # two prompts in one request
      dslaunch query --schema '{"type": "object", "properties": {"ok": {"type": "boolean"}}}' "Well?"
      dslaunch query --logprobs 3 --json "Hello"
      dslaunch query --embed "first text" "second text"
      dslaunch query --health --deep
    """
    from dslaunch import client as front_client

    texts = [sys.stdin.read() if p == "-" else p for p in prompts]
    params = {k: v for k, v in {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                                "top_k": top_k, "seed": seed}.items() if v is not None}  # fmt: skip
    if stop:
        params["stop"] = list(stop)
    params.update(_penalties(penalties))
    asks = sum([bool(texts) and not infer_json, bool(infer_json), health, want_stats])
    if asks != 1:
        raise UserError("give prompts (or --embed texts), --infer JSON, --health or --stats: exactly one of them")
    rec = state.require(name)
    with front_client.for_job(rec, timeout=timeout, router=router) as c:
        try:
            answer = _ask(c, texts, params, stream, embed, infer_json, health, deep, want_stats, as_json)
        except front_client.FrontError as e:
            raise UserError(f"front {c.address}: {e.code}: {e.message}") from None
        except (ConnectionError, TimeoutError, OSError) as e:
            raise UserError(f"{e} (is the job serving? see 'dslaunch status --name {name}')") from None
        except KeyboardInterrupt:
            click.echo()
            sys.exit(130)  # the front notices the closed connection and stops generating for it
    if answer is not None:
        if as_json or health or want_stats or infer_json:
            click.echo(json.dumps(answer, indent=1, ensure_ascii=False))
        else:
            console.print(render.answer_text(answer), markup=False, highlight=False)


def _ask(c: Any, texts: list[str], params: dict[str, Any], stream: bool, embed: bool, infer_json: str | None,
         health: bool, deep: bool, want_stats: bool, as_json: bool) -> dict[str, Any] | None:  # fmt: skip
    """One request to the front; streamed text is printed here as it arrives."""
    if health:
        return c.health(deep=deep)
    if want_stats:
        return c.stats()
    if infer_json is not None:
        try:
            value = json.loads(infer_json)
        except ValueError as e:
            raise UserError(f"--infer: not valid JSON ({e})") from None
        return c.request("infer", input=value)
    one = texts[0] if len(texts) == 1 else texts
    if embed:
        return c.request("embed", input=one)
    if not stream:
        return c.generate(one, **params)
    if len(texts) != 1:
        raise UserError("--stream takes one prompt")
    final = None
    for event in c.stream(texts[0], **params):
        if "chunk" in event and not as_json:
            click.echo(render.plain(event["chunk"]), nl=False)
            sys.stdout.flush()
        elif "chunk" not in event:
            final = event
    if not as_json:
        click.echo()
        return None
    return final


def _penalties(given: dict[str, Any]) -> dict[str, Any]:
    """The penalty options as request fields; --logit-bias TOKEN=BIAS pairs as a map, --schema as
    a response_format."""
    out = {k: v for k, v in given.items() if v is not None and k not in ("logit_bias", "schema")}
    if given.get("schema") is not None:
        out["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "query", "schema": _schema(given["schema"])},
        }
    bias: dict[str, float] = {}
    for pair in given.get("logit_bias") or ():
        token, sep, value = pair.partition("=")
        try:
            if not sep or not token.strip().isdigit():
                raise ValueError(pair)
            bias[token.strip()] = float(value)
        except ValueError:
            raise UserError(f"--logit-bias {pair!r}: give TOKEN=BIAS, a token id and a number") from None
    if bias:
        out["logit_bias"] = bias
    return out


def _schema(value: str) -> dict[str, Any]:
    """--schema: a JSON schema object, given inline or as @FILE."""
    where = "--schema"
    if value.startswith("@"):
        where = f"--schema {value}"
        try:
            value = Path(value[1:]).read_text()
        except OSError as e:
            raise UserError(f"{where}: {e.strerror}") from None
    try:
        schema = json.loads(value)
    except ValueError as e:
        raise UserError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(schema, dict):
        raise UserError(f"{where}: a JSON schema is an object")
    return schema
