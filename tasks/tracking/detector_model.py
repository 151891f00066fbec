"""The file MLflow stores as each detector model's code ("models from code").

Loading a model runs this file, which builds the wrapper from the installed `vadflow` package, so
nothing is unpickled: the detector's weights are read with `weights_only=True` by its own `load`.
"""

from mlflow.models import set_model

from vadflow.tasks.tracking.pyfunc import DetectorModel

set_model(DetectorModel())
