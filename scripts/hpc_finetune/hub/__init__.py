"""The shared git-lfs cache of hub models: pinned, checked, repaired, locked, never holding the token."""
