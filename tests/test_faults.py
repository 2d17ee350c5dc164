"""Issue 12: the cache and its inputs tried as a hostile but realistic user would.

One section per case of the issue's "Why", each on real files, real tars, real Zarr
stores and real processes. Every case must end in one clear line naming the file, key
or option (or a counted, recorded skip), with nothing wrong trained on.
"""

from __future__ import annotations

# --- 1. nothing recorded in a cache is executed or followed out of it -------------------

# --- 2. concurrent writers on one --out lose nothing -----------------------------------

# --- 3. every chunk read is checked; damage is found and repaired ----------------------

# --- 4. a truncated tar is an error, never a shorter complete shard -------------------

# --- 5. shard identity: the bytes trained on are the bytes extracted -------------------

# --- 6. --resume refuses another cache, teacher, model or data -------------------------

# --- 7. repeated keys and 16-bit images ------------------------------------------------

# --- 8. one line for every user error and environment fault ----------------------------
