"""Evaluation: generating answers (`evaluate`), the prompt sets (`prompt_sets`), the judges
(`judges`, `careful_judge`, `refusal`), the labelled answers they are measured on
(`judge_labels`) and re-judging saved answers (`rejudge`)."""
