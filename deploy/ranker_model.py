"""MLflow pyfunc (models-from-code, no pickled objects): the champion ranker scores a pandas frame of
(user_id, item_id) rows by fetching its features from the feature store, pinned to its codebook version.
The loading process finds the store through SEMALIGN_* settings (SEMALIGN_HOME by default); the model's
metadata (`semalign` in MLmodel) names the codebook version, user-feature snapshot and Feast project it needs.

Ids may come as strings or integers: a CSV or JSON of integer-looking ids is parsed into integer columns
(`mlflow models predict -t csv` reads the file without the signature's types, and MLflow refuses an integer column
where a signature says string), so the logged signature declares only the output (deploy/registry.py) and
`predict` checks the columns and turns each id into its string."""
import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

INPUT_COLUMNS = ("user_id", "item_id")


def id_strings(frame: pd.DataFrame, column: str) -> list[str]:
    """The column's ids as strings: a string as it is, an integer (or a whole float, as pandas parses an integer
    column with blanks) in decimal; anything else is refused by row."""
    from semalign.deploy.scoring import ScoringError

    out = []
    for row, v in enumerate(frame[column].tolist()):
        if isinstance(v, str) and v:
            out.append(v)
        elif isinstance(v, int) and not isinstance(v, bool):
            out.append(str(v))
        elif isinstance(v, float) and v.is_integer():
            out.append(str(int(v)))
        else:
            raise ScoringError(f"{column}, row {row}: {v!r} is not an id (expected a non-empty string or an integer)")
    return out


class SemalignRanker(PythonModel):
    def load_context(self, context):
        from semalign.deploy.scoring import RankerScorer

        self.scorer = RankerScorer(context.artifacts["ranker"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.Series:
        """model_input: user_id, item_id per row (strings or integers); returns the pCTR per row."""
        from semalign.deploy.scoring import ScoringError

        missing = [c for c in INPUT_COLUMNS if c not in model_input.columns]
        if missing:
            raise ScoringError(f"the frame needs columns user_id and item_id (missing {missing})")
        users, items = (id_strings(model_input, c) for c in INPUT_COLUMNS)
        return pd.Series(self.scorer.score(users, items), name="score")


mlflow.models.set_model(SemalignRanker())
