"""MLflow pyfunc (models-from-code) of the SID tokenizer bundle: item ids -> their semantic IDs ("c0-c1-c2-dedup")
under the bundle's codebook version. The bundle itself (artifact `bundle`) loads without MLflow or semalign:
`sid_tokenizer.py` inside it needs only torch and numpy."""
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
        """model_input: item_id per row; returns each item's full SID."""
        codes = self.tok.sids(model_input["item_id"].astype(str).tolist())
        return pd.Series(["-".join(map(str, r)) for r in codes.tolist()], name="sid")


mlflow.models.set_model(SidTokenizerModel())
