"""Every size limit the store enforces, in one place.

Each limit is checked on write (``ValueError`` naming the value, before the first byte is
written) and on read (``CorruptFileError`` naming the file, before anything is allocated), so
whatever a call accepts reads back, and a hostile file cannot make a reader allocate unbounded
memory or recurse without bound.
"""

from __future__ import annotations

# Any JSON file the store writes or reads (meta.json, a batch's or model's metadata.json); the size
# is checked with fstat before reading. safetensors uses the same figure for its header.
MAX_JSON_BYTES = 100_000_000

# A safetensors header (safetensors refuses larger ones too).
MAX_HEADER_BYTES = 100_000_000

# Nesting of any JSON document. Python's json recurses in C once per level (and raises
# RecursionError near sys.getrecursionlimit()); 200 leaves that far away for any caller.
MAX_JSON_DEPTH = 200

# Batch indices fit an int64 (torch, numpy and every JSON reader hold them exactly).
MAX_BATCH_INDEX = 2**63 - 1

# A put_tensor/get_tensor key or a store prefix, in UTF-8 bytes (each component is a name of
# at most MAX_NAME_BYTES); keeps base_path + key under PATH_MAX for other tools.
MAX_KEY_BYTES = 1024

# A single path component (run id, layer, key, model id): room under NAME_MAX (255) for the
# ".safetensors" suffix that tensor keys receive on disk.
MAX_NAME_BYTES = 200

# Dimensions of one stored tensor (a hostile header could otherwise ask for millions).
MAX_NDIM = 1024
