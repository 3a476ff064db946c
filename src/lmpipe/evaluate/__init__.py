"""The ``evaluate`` stage: language-modelling quality (loss, perplexity, bits per byte), task
scores (classification accuracy / F1, BLEU and ROUGE-L of instruction answers), efficiency
(parameters, size, generation speed), the teacher/student comparison and the HTML report.

Public API for other stages::

    from lmpipe.evaluate.lm import score_tokens, check_model_tokenizer
    from lmpipe.evaluate.tasks import rouge_l, bleu
    from lmpipe.evaluate.speed import measure
    from lmpipe.evaluate.run import run          # lmpipe evaluate
"""
