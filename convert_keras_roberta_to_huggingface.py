#!/usr/bin/env python
"""Convert the Keras COMET critic to a RoBERTa folder + head (safetensors); see lolrl/comet_convert.py.

    python convert_keras_roberta_to_huggingface.py        # the original's paths
    python convert_keras_roberta_to_huggingface.py -i critic_weights.npz -o saved_models/comet_critic_keras_to_pytorch
"""
import sys

from lolrl.tasks.paper.comet_convert import main

if __name__ == "__main__":
    sys.exit(main())
