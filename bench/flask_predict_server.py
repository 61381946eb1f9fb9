"""The reports' style of demo server: Flask, `model.predict` per request. A reference for serve_latency.py only.

    python bench/flask_predict_server.py MODEL.keras IMAGE_SIZE PORT
"""

from __future__ import annotations

import base64
import io
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from flask import Flask, jsonify, request  # noqa: E402
from PIL import Image  # noqa: E402

model = keras.saving.load_model(sys.argv[1], compile=False)
size = int(sys.argv[2])
app = Flask(__name__)


@app.get("/ping")
def ping():
    return "ok"


@app.post("/invocations")
def invocations():
    data = base64.b64decode(request.get_json()["image"])
    image = Image.open(io.BytesIO(data)).convert("RGB").resize((size, size))
    x = np.asarray(image, dtype=np.float32)[None] / 255.0
    probabilities = model.predict(x, verbose=0)[0]
    return jsonify({"label": int(probabilities.argmax()), "probabilities": probabilities.tolist()})


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(sys.argv[3]), threaded=True)
