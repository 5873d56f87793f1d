"""Evaluation: `runner` (one row scorer shared by `emoq eval` and `emoq predict`, sharded over ranks),
`metrics` (the literature's WA / UA / weighted and macro F1, scikit-learn underneath) and `report` (the files
an evaluation leaves, with the protocol next to the numbers)."""
