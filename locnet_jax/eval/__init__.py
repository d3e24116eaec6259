"""Stage 4, evaluation: restoring a trained model, predicting, scoring, metrics and figures."""
