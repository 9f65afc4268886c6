"""The study's figures and the tables behind them (stage figures).

A folder per concern, so dvc.yaml can name each stage's code as one or two folders."""
