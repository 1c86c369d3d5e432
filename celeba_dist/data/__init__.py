"""Shards to uint8 batches: streams with exact sample accounting, decoding and transforms. Never imports
models.
"""
