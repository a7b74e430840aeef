"""mmdet-mlflow's library beyond the served model: CLI, data, training, evaluation, Azure."""
