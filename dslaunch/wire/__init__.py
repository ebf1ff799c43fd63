"""Types that cross process boundaries: the NDJSON protocol, records, the node layout, states."""
