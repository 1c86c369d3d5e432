"""The on-disk contract of packed shards: the manifest schema and the tar reader. Standard library only:
the packer, the loader and ``verify`` share it.
"""
