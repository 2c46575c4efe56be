"""Where and how a process computes, decided once for training, evaluation, text vectors and
inference alike: the device and precision (:mod:`.device`), the process group
(:mod:`.distributed`), weights, checkpoints and random states (:mod:`.checkpoints`), and the
facts recorded about them (:mod:`.environment`)."""
