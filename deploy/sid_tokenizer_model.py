"""MLflow pyfunc (models-from-code) of the SID tokenizer bundle: item ids -> their semantic IDs ("c0-c1-c2-dedup")
under the bundle's codebook version. The bundle itself (artifact `bundle`) loads without MLflow or semalign:
`sid_tokenizer.py` inside it needs only torch and numpy (so this module imports nothing of semalign either: its
environment has none)."""
import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class SidTokenizerModel(PythonModel):
    def load_context(self, context):
        import importlib.util

        folder = context.artifacts["bundle"]
        spec = importlib.util.spec_from_file_location("sid_tokenizer", f"{folder}/sid_tokenizer.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        self.tok = mod.SidTokenizer.load(folder)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.Series:
        """model_input: item_id per row (strings or integers, as the ranker's `predict` takes them); returns each
        item's full SID."""
        if "item_id" not in model_input.columns:
            raise ValueError(f"the frame needs a column item_id (got {list(model_input.columns)})")
        ids = []
        for row, v in enumerate(model_input["item_id"].tolist()):
            if isinstance(v, float) and v.is_integer():  # an integer column with blanks, as pandas parses it
                v = int(v)
            if not ((isinstance(v, str) and v) or (isinstance(v, int) and not isinstance(v, bool))):
                raise ValueError(f"item_id, row {row}: {v!r} is not an id (expected a non-empty string or an integer)")
            ids.append(str(v))
        codes = self.tok.sids(ids)
        return pd.Series(["-".join(map(str, r)) for r in codes.tolist()], name="sid")


mlflow.models.set_model(SidTokenizerModel())
