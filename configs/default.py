"""The embedded default: a tiny T5 trained from scratch on the synthetic mixture.

Runs anywhere (no files, no checkpoint, byte vocabulary) and finishes in a few
minutes on a 2-core CPU with the loss clearly falling:

    ift-jax train --workdir=/tmp/ift_default
    ift-jax train --config=configs/default.py --workdir=/tmp/ift_default \\
        --config.train.steps=100

Every other config starts from `get_config()` here and changes what it needs.
"""

import ml_collections


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.preset = "tiny"  # T5 preset (ift_jax.models.t5.PRESETS), overridden below.
    c.model.vocab_size = 384  # Byte vocabulary (259 ids) rounded up.
    c.model.d_model = 128
    c.model.d_ff = 256
    c.model.num_heads = 4
    c.model.d_kv = 32
    c.model.num_layers = 2
    c.model.num_decoder_layers = 2
    c.model.dropout_rate = 0.0
    c.model.dtype = "float32"  # Compute dtype; params stay float32.
    # Memory levers (same function and params): rematerialize each layer in the backward
    # pass (none | full | save_dots | a jax.checkpoint_policies name), and run each stack
    # as one compiled layer body over stacked layer params (imports/exports stay unrolled).
    c.model.remat = "none"
    c.model.scan_layers = False

    # Start-up order: resume from the workdir, else init_from (an HF directory or
    # another ift_jax workdir), else from scratch.
    c.init_from = ""

    c.data = ml_collections.ConfigDict()
    c.data.mixture = "ift_synthetic"
    c.data.vocab = "byte"  # Or a SentencePiece .model (FLAN-T5's spiece.model).
    c.data.data_dir = ""  # Default: $IFT_JAX_DATA_DIR.
    # Tasks written by `ift-jax tasks cache` (local or gs://): read instead of rendered.
    c.data.cache_dir = ""
    c.data.inputs_length = 192
    c.data.targets_length = 64
    c.data.pack = True
    c.data.seed = 0
    # How hosts split the data: "examples" (each host reads 1/N of every split;
    # cheapest) or "global_batch" (every host builds the same global batch and
    # keeps its rows: identical batches for any number of hosts).
    c.data.host_sharding = "examples"
    # The training stream: "seqio" (SeqIO's tf.data pipeline; a resume at step N
    # computes and drops N batches) or "indexed" (ift_jax.data.indexed: the tasks are
    # read into memory once and batches follow from a position of a few integers,
    # saved beside each checkpoint, so a resume starts at once).
    c.data.pipeline = "seqio"

    c.train = ml_collections.ConfigDict()
    c.train.steps = 200
    c.train.batch_size = 32  # Global, over all hosts.
    c.train.num_microbatches = 1
    c.train.seed = 0
    c.train.log_every = 20
    c.train.checkpoint_every = 100
    c.train.keep_checkpoints = 3
    # Stop when an evaluated metric stops improving (ift_jax.best): "<task>/<metric>" or
    # "<suite>/<aggregate>" (e.g. "mmlu_5shot/score"); empty = train all steps. The run
    # ends checkpointed, with summary.json saying why.
    c.train.early_stopping = ml_collections.ConfigDict()
    c.train.early_stopping.metric = ""
    c.train.early_stopping.patience = 3  # Evaluations without an improvement.
    c.train.early_stopping.min_delta = 0.0  # Smaller changes are no improvement.
    c.train.early_stopping.mode = "auto"  # max | min | auto (min for loss-like metrics).

    # Besides the last train.keep_checkpoints: keep the checkpoint of the best evaluation
    # by "<task>/<metric>" (or "<suite>/<aggregate>"); WORKDIR/best_checkpoint.json names
    # it. Empty = only the last ones.
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.keep_best = ""
    c.checkpoint.keep_best_mode = "auto"  # max | min | auto (min for loss-like metrics).

    # Evaluation: decoding + the tasks' metrics, teacher-forced validation loss, rank
    # classification over answer choices; written to eval/step_<N>.json and
    # predictions/step_<N>/<task>.jsonl (ift_jax.evaluation).
    c.eval = ml_collections.ConfigDict()
    c.eval.every = 100  # Steps; 0 = no evaluation during training.
    c.eval.at_start = True  # Also evaluate the starting model as step 0.
    c.eval.tasks = ""  # Tasks or mixtures, comma-separated; empty = data.mixture.
    # Held-out tasks (or mixtures, e.g. "ift_guard") evaluated at step 0 and every
    # eval: forgetting = their change from step 0 (report/forgetting.json).
    c.eval.guard_tasks = ""
    c.eval.incontext_shots = ""  # e.g. "0,1,3": the starting model with k exemplars.
    # Held-out benchmark suites (ift_jax.suites), each by its paper's protocol, at step 0
    # and every eval: mmlu_0shot, mmlu_5shot, bbh_direct, bbh_cot, glue, superglue.
    c.eval.suites = ""
    c.eval.suite_max_examples = 0  # Per suite task; 0 = the whole split.
    c.eval.suite_inputs_length = 0  # 0 = the suite's own (fits its longest prompts).
    c.eval.metrics = ""  # Metric names replacing the tasks' own; empty = the tasks'.
    c.eval.split = "validation"
    c.eval.max_examples = 64  # Per task; 0 = the whole split.
    c.eval.batch_size = 32  # Global rows per batch (rounded up to the data x fsdp shards).
    # Inputs are padded to the shortest of this many lengths that fits (inputs_length
    # halved k times), not always to inputs_length; each length compiles once.
    c.eval.length_buckets = 4
    c.eval.max_decode_length = 64
    c.eval.num_beams = 1  # 1 = greedy; >1 = beam search (HF's length penalty).
    c.eval.length_penalty = 1.0
    # How rougeLsum finds sentences: "pysbd" (rule-based, offline), "t5" (the t5
    # library's split at " . ", which untokenized text never has), or "none".
    c.eval.rouge_sentence_split = "pysbd"

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 3e-3
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 20
    c.optimizer.end_learning_rate = 3e-4
    c.optimizer.weight_decay = 0.0
    c.optimizer.grad_clip_norm = 1.0
    c.optimizer.multiply_by_parameter_scale = False  # Adafactor only.
    # True: the optimizer state lives in host memory (pinned_host) and is moved to the
    # devices for each update, then back (QLoRA's paged optimizers, by JAX memory kinds).
    c.optimizer.offload_state = False

    c.loss = ml_collections.ConfigDict()
    c.loss.z_loss = 1e-4
    c.loss.label_smoothing = 0.0
    c.loss.normalization = "tokens"

    c.peft = ml_collections.ConfigDict()
    # One of ift_jax.peft.METHODS: full | lora | qlora | prompt | houlsby | pfeiffer | ia3 |
    # prefix (docs/peft.md).
    c.peft.method = "full"
    c.peft.trainable_regex = ""  # e.g. ".*layer_norm.*" for selective tuning.
    c.peft.lora_rank = 32
    c.peft.lora_alpha = 32.0
    c.peft.lora_dropout = 0.0
    # "" or "qv": attention query and value (HF PEFT's T5 default); "all": every linear
    # layer of the blocks (attention q, k, v, o and the MLP); else a regex over module paths.
    c.peft.lora_targets = ""
    c.peft.lora_use_rslora = False  # rsLoRA: scale alpha / sqrt(r) instead of alpha / r.
    c.peft.lora_use_dora = False  # DoRA: a trained magnitude per output unit (lora only).
    c.peft.qlora_tile_size = 64
    # QLoRA's double quantization (paper section 3): the NF4 scales stored as FP8 codes with
    # an fp32 step per 256 scales (0.127 instead of 0.5 bits per weight at tile 64);
    # ift_jax/double_quant.py. qlora only.
    c.peft.qlora_double_quant = False
    # Frozen (non-trained) params of PEFT runs on the devices: float32 | bfloat16 (half the
    # memory; with model.dtype=bfloat16 the computation is unchanged). Trained params and
    # their optimizer state stay float32.
    c.peft.frozen_dtype = "float32"
    c.peft.prompt_length = 100
    c.peft.prompt_init = "vocab"  # uniform | vocab | text
    c.peft.prompt_init_text = ""  # For init text: tokenized with the run's vocabulary.
    c.peft.prompt_init_ids = ""  # For init text: token ids ("12 7 9"), used instead of the text.
    c.peft.adapter_width = 64  # houlsby / pfeiffer: the bottleneck width.
    c.peft.adapter_activation = "relu"  # houlsby / pfeiffer: between down and up projection.
    # ia3: projections whose output is scaled (query, key, value, out, wi, wi_0, wi_1) and
    # wo, whose input is (the MLP's intermediate activations). Default: HF PEFT's k, v, wo.
    c.peft.ia3_targets = "key,value,wo"
    c.peft.prefix_length = 20  # prefix: key/value positions per attention block.
    # prefix: "all" (encoder self-, decoder self- and cross-attention, each layer its own)
    # or "peft" (what HF PEFT does for T5: decoder self-attention only; exportable to PEFT).
    c.peft.prefix_placement = "all"
    c.peft.prefix_hidden = 0  # prefix: reparameterization MLP width while training (0: none).

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1

    # Peak FLOP/s of one device for MFU; 0 = unknown (MFU not reported).
    c.device_peak_flops = 0.0
    return c
