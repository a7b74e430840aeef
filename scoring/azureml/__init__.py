"""The Azure ML entry scripts: score.py (online endpoints) and batch_score.py (batch endpoints),
and the request parsing of online endpoints. Azure uploads this folder as the scoring code."""
