"""Rank 0's front: the asyncio server, the batcher that feeds the engine, and its stats."""
