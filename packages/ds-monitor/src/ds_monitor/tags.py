"""Event names (tags) the engine logs, DeepSpeed's where DeepSpeed has one; ``ds-monitor plot`` knows them.

DeepSpeed logs its training scalars against the number of samples seen so far
(``global_samples``) as the step; zero-all does the same.
"""

PREFIX = "Train/Samples/"
TRAIN_LOSS = PREFIX + "train_loss"
LR = PREFIX + "lr"
LOSS_SCALE = PREFIX + "loss_scale"
GRAD_NORM = PREFIX + "grad_norm"
SAMPLES_PER_SEC = PREFIX + "samples_per_sec"
TOKENS_PER_SEC = PREFIX + "tokens_per_sec"
TFLOPS = PREFIX + "tflops"
