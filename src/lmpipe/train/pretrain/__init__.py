"""Stage ``pretrain``: its config section (:mod:`.config`) and entry point (:mod:`.stage`)."""
