"""Stage ``finetune``: config (:mod:`.config`), task data (:mod:`.data`, :mod:`.sft`,
:mod:`.classify`) and the entry point (:mod:`.stage`)."""
