"""A hyperparameter sweep with scikit-learn: one model configuration per task.

Params (stdin, one JSON line per task):
    {"model": "logistic", "C": 1.0}
    {"model": "forest", "n_estimators": 50, "max_depth": 4}

Every task scores its model with 5-fold cross-validation on the same synthetic classification
problem (`dataset_seed`, default 0, so that all tasks compare on one dataset) and writes one row
to /out/metrics.csv. `grid results JOB -o DIR --concat metrics.csv` gathers the rows into one
table, DIR/metrics.csv.
"""

import csv
import json
import sys

import numpy as np
from sklearn.datasets import make_classification
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

import grid

task = grid.task()
params = grid.params(default={"model": "logistic", "C": 1.0})
X, y = make_classification(
    n_samples=int(params.get("samples", 600)),
    n_features=20,
    n_informative=6,
    random_state=int(params.get("dataset_seed", 0)),
)
kind = params.get("model")
if kind == "logistic":
    model = LogisticRegression(C=float(params.get("C", 1.0)), max_iter=1000)
elif kind == "forest":
    model = RandomForestClassifier(
        n_estimators=int(params.get("n_estimators", 50)),
        max_depth=params.get("max_depth"),
        random_state=task.seed % 2**32,
    )
else:
    sys.exit(f"unknown model {kind!r}: use logistic or forest")

scores = cross_val_score(model, X, y, cv=5)
with grid.output("metrics.csv") as f:
    out = csv.writer(f)
    out.writerow(["task", "params", "accuracy_mean", "accuracy_std"])
    out.writerow(
        [
            task.index,
            json.dumps(params, sort_keys=True),
            f"{np.mean(scores):.4f}",
            f"{np.std(scores):.4f}",
        ]
    )
print(f"task {task.index}: {kind} {params} accuracy {np.mean(scores):.4f}")
