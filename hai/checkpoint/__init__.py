"""Checkpoints: the DCP state every rank saves and loads (``state``), the files on disk (``files``: paths, atomic
commit, keep-last-K, integrity checks), and ``hai convert`` between HAI checkpoints and Hugging Face weights
(``convert``)."""
