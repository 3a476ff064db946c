"""Stage ``distill``: config (:mod:`.config`), losses and teacher targets (:mod:`.losses`) and the
entry point (:mod:`.stage`)."""
