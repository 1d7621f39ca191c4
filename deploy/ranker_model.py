"""MLflow pyfunc (models-from-code, no pickled objects): the champion ranker scores a pandas frame of
(user_id, item_id) rows by fetching its features from the feature store, pinned to its codebook version.
The loading process finds the store through SEMALIGN_* settings (SEMALIGN_HOME by default); the model's
metadata (`semalign` in MLmodel) names the codebook version, user-feature snapshot and Feast project it needs."""
import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class SemalignRanker(PythonModel):
    def load_context(self, context):
        from semalign.deploy.scoring import RankerScorer

        self.scorer = RankerScorer(context.artifacts["ranker"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.Series:
        """model_input: user_id, item_id (strings) per row; returns the pCTR per row."""
        return pd.Series(self.scorer.score_frame(model_input), name="score")


mlflow.models.set_model(SemalignRanker())
