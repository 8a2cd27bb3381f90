"""The results schema's columns, written down once: name, type and meaning of each.

:mod:`robench.results.storage` builds the parquet schemas from these lists and is the only
code that writes them; ``robench show --schema`` prints them.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
"""Schema versions this robench reads. Version 2 added the corruption columns (nullable; a
version-1 file reads with them null) and the ``corruption`` norm; version 3 the shard columns
(``batch_size``, ``shard_size``, ``shards``), the sample order, the published-reference, the
no-gradient-path, BPDA, attack-failure indicator and EOT-probe columns (null in older
files): older folders stay readable."""

# name, type, meaning: the schema is written down once, here.
CELL_COLUMNS: list[tuple[str, pa.DataType, str]] = [
    ("schema_version", pa.int32(), "version of this schema"),
    ("cell_key", pa.string(), "the cell (joins cells.cell_key)"),
    ("cell_id", pa.string(), "readable id: dataset/arch/defense/variant/attack/norm/eps/seed"),
    ("dataset", pa.string(), "dataset plugin name"),
    ("arch", pa.string(), "architecture plugin name"),
    ("defense", pa.string(), "defense plugin name"),
    ("defense_params", pa.string(), "resolved defense parameters (preset + user), canonical JSON"),
    ("preset", pa.string(), "preset the defense parameters came from: smoke or paper"),
    ("variant", pa.string(), "which of the defense's models was evaluated"),
    ("protocol", pa.string(), "protocol name (an --attack NAME run is the one-attack protocol NAME)"),
    ("protocol_spec", pa.string(), "the resolved protocol: uses, attack parameters, surrogates; canonical JSON"),
    ("protocol_revision", pa.int32(), "revision of the protocol definition (bumped when numbers would move)"),
    ("transfer", pa.bool_(), "true if any version attacks a surrogate (black-box transfer)"),
    ("norm", pa.string(), "threat norm: linf, l2, or corruption (common corruptions: no radius, eps 0)"),
    ("eps", pa.float64(), "threat radius in [0, 1] pixel units (0 for corruption cells)"),
    ("seed", pa.int64(), "seed of the model build (training) and of the attack's random starts"),
    ("status", pa.string(), "ok, or error (then error holds the message)"),
    ("error", pa.string(), "error text for status=error, else empty"),
    ("n", pa.int64(), "number of evaluated samples"),
    ("sample_seed", pa.int64(), "seed of the random evaluation subset of the test split"),
    ("clean_acc", pa.float64(), "accuracy on clean inputs"),
    # corruption cells: robust_acc is RobustBench's corruption accuracy (the mean over the sets), not all-or-nothing
    ("robust_acc", pa.float64(), "all-or-nothing accuracy: correct clean and under every version (corruption: mean)"),
    # corruption cells: a normal interval over samples of each sample's share of sets classified correctly
    ("robust_ci_low", pa.float64(), "Wilson 95% interval of robust_acc, low end (corruption: normal, see above)"),
    ("robust_ci_high", pa.float64(), "Wilson 95% interval of robust_acc, high end"),
    ("n_versions", pa.int64(), "number of attack versions (restarts) in the protocol"),
    ("exhaustive", pa.bool_(), "true if every version ran on every sample (no early exit)"),
    # batch-seeded attacks (apgd, square, autoattack) and random models: the numbers are a function of these
    ("batch_size", pa.int32(), "attack batch size the cell ran with"),
    ("shard_size", pa.int32(), "samples per shard: the subset was evaluated in slices of at most this many"),
    ("shards", pa.int32(), "how many shards the cell's subset was cut into (parts/ keeps one file each)"),
    ("randomized", pa.bool_(), "true if the variant was evaluated as randomized: declared, or found by the checks"),
    ("eot", pa.int32(), "randomized variants: softmax draws averaged for gradient attacks (EOT); else 0"),
    ("votes", pa.int32(), "predictions per verdict: a majority of `votes` draws decides (1 if deterministic)"),
    ("params", pa.int64(), "number of model parameters"),
    ("nonzero_params", pa.int64(), "number of non-zero parameters"),
    ("bits", pa.int32(), "bits per stored weight"),
    ("model_bytes", pa.int64(), "weight storage: params * bits / 8, or the variant's sparse size (its encoding)"),
    ("macs", pa.int64(), "multiply-accumulates per image (conv and linear layers)"),
    ("latency_ms", pa.float64(), "median wall time of one single-image forward pass on `device`"),
    ("build_seconds", pa.float64(), "seconds spent training/compressing the model (0 when cached)"),
    ("attack_seconds", pa.float64(), "seconds spent evaluating the cell (attacks and scoring)"),
    ("transfer_seconds", pa.float64(), "part of attack_seconds spent loading or generating transfer sets"),
    ("gradient_calls", pa.int64(), "sample-level forward passes with gradients through the attacked model"),
    ("queries", pa.int64(), "all sample-level forward passes through the attacked model during attacks"),
    ("versions", pa.string(), "JSON list of version labels; samples.version indexes it"),
    ("transfer_sets", pa.string(), "JSON list of the cached transfer-set (or corruption-set) files this cell used"),
    ("transfer_generated", pa.int64(), "how many of transfer_sets this cell generated (0: all read from the cache)"),
    ("flag_loss_not_increasing", pa.bool_(), "sanity: white-box attacks left the mean loss below the clean loss"),
    ("flag_eps_not_monotonic", pa.bool_(), "sanity: robust accuracy rises with eps (same model, protocol)"),
    ("flag_whitebox_above_transfer", pa.bool_(), "sanity: white-box accuracy above transfer accuracy, same eps"),
    ("flag_large_eps_survives", pa.bool_(), "sanity: linf eps >= 0.5 leaves robust accuracy above 20%"),
    ("flag_randomized_without_eot", pa.bool_(), "sanity: a randomized variant attacked without EOT"),
    ("checks", pa.string(), "model checks run before the attack: 'ok', or the checks that fired, comma-separated"),
    ("check_samples", pa.int32(), "evaluation samples the model checks ran on (the first of the subset)"),
    ("check_seconds", pa.float64(), "seconds the model checks took (not part of attack_seconds)"),
    ("check_randomized", pa.bool_(), "check: repeated predictions on the same inputs differed (declared or not)"),
    ("flag_undeclared_randomness", pa.bool_(), "check: undeclared random prediction; evaluated as randomized"),
    ("flag_probability_outputs", pa.bool_(), "check: outputs are probabilities (>= 0, sum 1); attacks got their log"),
    ("check_vanishing_share", pa.float64(), "check: share of check samples with zero or vanishing input gradient"),
    ("flag_vanishing_gradients", pa.bool_(), "check: vanishing input gradients; transfer and Square versions added"),
    ("masking_found_by", pa.string(), "JSON: added use -> samples it fooled that the protocol's versions missed"),
    ("flag_batch_dependent", pa.bool_(), "check: a sample's prediction changes with the rest of its batch"),
    ("flag_no_gradient_path", pa.bool_(), "check: output not differentiable in the input; gradient versions skipped"),
    (
        "no_gradient_reason",
        pa.string(),
        "check: why there is no gradient path (no grad_fn, None gradient, ...); else empty",
    ),
    ("skipped_versions", pa.string(), "JSON list of version labels not run (gradient attacks, no gradient path)"),
    (
        "bpda",
        pa.string(),
        "gradient attacks crossed a declared preprocess by BPDA: identity or substitute X; else empty",
    ),
    # indicators of attack failure (Pintor et al. 2022) on the check samples: robench/execute/indicators.py
    ("indicators", pa.string(), "indicators of attack failure that fired, comma-separated; 'ok'; 'n/a' (corruption)"),
    ("indicator_attack", pa.string(), "the white-box version whose path and unbounded run indicators 1, 2, 6 measured"),
    ("indicator_silent_success", pa.float64(), "1: share of attacked check samples fooled on the path, not at its end"),
    ("indicator_incomplete_optimization", pa.float64(), "2: share of samples not fooled whose loss still moved"),
    (
        "indicator_transfer_failure",
        pa.float64(),
        "3: share of transfer examples fooling their surrogate, not the model",
    ),
    ("indicator_unavailable_gradients", pa.bool_(), "4: no gradient path, or a vanishing input gradient on any sample"),
    ("indicator_unstable_predictions", pa.float64(), "5: mean relative loss change under noise of width 8/255, max 1"),
    (
        "indicator_unconstrained_failure",
        pa.float64(),
        "6: share of correct check samples the attack without eps misses",
    ),
    ("indicator_seconds", pa.float64(), "seconds the indicators took (recording the path: also in attack_seconds)"),
    ("robench_version", pa.string(), "robench version"),
    ("plugins", pa.string(), "JSON of plugin -> distribution==version for every loaded plugin"),
    ("torch_version", pa.string(), "torch version"),
    ("device", pa.string(), "device the cell ran on"),
    ("cpu_capability", pa.string(), "CPU instruction set torch's kernels dispatched to (AVX2, AVX512, ...)"),
    ("cpu_pins", pa.string(), "JSON of the ISA/numerics environment pins in force (ATEN_CPU_CAPABILITY, ...)"),
    ("threads", pa.int32(), "torch CPU threads (float sums, and so CPU numbers, depend on it)"),
    ("quantized_engine", pa.string(), "int8 variants: the quantized kernels' engine (qnnpack, x86, ...); else empty"),
    ("git_revision", pa.string(), "git revision of the working directory, if any"),
    ("config_hash", pa.string(), "hash of the benchmark configuration"),
    ("model_hash", pa.string(), "content hash of the model key (model cache directory)"),
    ("weights_sha256", pa.string(), "models loaded from a file (checkpoint, model zoo): the file's sha256; else empty"),
    ("variant_config", pa.string(), "JSON architecture configuration the defense chose for the variant (ProARD)"),
    ("started_at", pa.timestamp("us", tz="UTC"), "when the cell's evaluation started"),
    ("finished_at", pa.timestamp("us", tz="UTC"), "when it finished"),
    # corruption cells only (protocol `corruptions`, norm `corruption`); null for every other cell
    ("corruption_acc", pa.float64(), "corruption: mean accuracy over every (corruption, severity) set (= robust_acc)"),
    ("corruption_worst", pa.string(), "corruption: the corruption of lowest accuracy over its severities (else empty)"),
    ("corruption_worst_acc", pa.float64(), "corruption: that corruption's accuracy averaged over severities"),
    ("corruption_s1_acc", pa.float64(), "corruption: mean accuracy over the corruptions at severity 1"),
    ("corruption_s2_acc", pa.float64(), "corruption: mean accuracy over the corruptions at severity 2"),
    ("corruption_s3_acc", pa.float64(), "corruption: mean accuracy over the corruptions at severity 3"),
    ("corruption_s4_acc", pa.float64(), "corruption: mean accuracy over the corruptions at severity 4"),
    ("corruption_s5_acc", pa.float64(), "corruption: mean accuracy over the corruptions at severity 5"),
    ("corruption_table", pa.string(), "corruption: JSON corruption -> accuracy per severity, in order (else empty)"),
    # version 3: how the evaluation subset was taken, and published numbers of the model (robench/results/reference.py)
    ("sample_order", pa.string(), "evaluation subset: random (drawn with sample_seed) or first (the first n in order)"),
    ("reference_clean_acc", pa.float64(), "published clean accuracy of the model (e.g. RobustBench's), else null"),
    ("reference_robust_acc", pa.float64(), "published robust (corruptions: mean corruption) accuracy, else null"),
    ("reference_source", pa.string(), "where the published numbers come from, and their protocol; else empty"),
    ("reference_followed", pa.bool_(), "the cell repeats the published evaluation (protocol, threat, sample order)"),
    ("flag_above_reference", pa.bool_(), "sanity: robust accuracy above the published one by more than its 95% CI"),
    # randomized variants: the EOT probe on the cell's first shard (robench/execute/eotcheck.py)
    ("eot_half", pa.int32(), "EOT probe (randomized variants): the first white-box version rerun with these draws"),
    ("eot_half_acc", pa.float64(), "EOT probe: its robust accuracy with eot_half draws, on the first shard's samples"),
    ("eot_full_acc", pa.float64(), "EOT probe: its robust accuracy with every draw (the cell's run), same samples"),
    ("eot_p", pa.float64(), "EOT probe: one-sided exact McNemar p-value that doubling the draws lowered it"),
    ("flag_eot_not_converged", pa.bool_(), "sanity: doubling EOT draws lowered robust accuracy (p < 0.05); raise eot"),
]

SAMPLE_COLUMNS: list[tuple[str, pa.DataType, str]] = [
    ("cell_key", pa.string(), "the cell (joins cells.cell_key)"),
    ("sample", pa.int64(), "index of the sample in the dataset's test split"),
    ("version", pa.int32(), "-1 for the clean input, else the version (corruption: set) index in cells.versions"),
    ("correct", pa.bool_(), "whether the model classified this input correctly"),
]
