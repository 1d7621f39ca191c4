"""MLflow pyfunc (models-from-code, no pickled objects): the champion ranker scores a pandas frame of
(user_id, item_id) rows by fetching its features from the feature store, pinned to its codebook version.
The loading process finds the store through SEMALIGN_* settings (SEMALIGN_HOME by default)."""
import mlflow
from mlflow.pyfunc import PythonModel


class SemalignRanker(PythonModel):
    def load_context(self, context):
        from semalign.deploy.scoring import RankerScorer

        self.scorer = RankerScorer(context.artifacts["ranker"])

    def predict(self, context, model_input, params=None):
        import pandas as pd

        return pd.Series(self.scorer.score_frame(model_input), name="score")


mlflow.models.set_model(SemalignRanker())
