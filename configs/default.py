"""Every configuration field, declared once with its meaning. Variants derive from `get_config()`.

    python train.py --config=configs/default.py --workdir=/tmp/locnet

Sections: `data` (what is read and how it is gridded), `model` (architecture), `train` (optimisation),
`eval` (test-time uncertainty). Unknown override keys are rejected (`lock_config=True` in `train.py`).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # one root seed: parameters, noise injection and data order all derive from it

  config.data = data = ml_collections.ConfigDict()
  # "synthetic": blob images made in memory (locnet_jax/data/synthetic.py); "manifest": the data set at
  # data.manifest (docs/data_format.md); "afids": the AFIDs benchmark in data.afids_dir, built there if absent
  data.source = "afids"
  data.manifest = ""  # path of a dataset.json (or its folder), for source "manifest"
  data.afids_dir = "data/afids"  # for source "afids" (the default: no data set named -> AFIDs)
  data.afids_landmarks = "AC,PC,GENU,SPLE,RLVAC,LLVAC"  # AFIDs used when the set is built here
  data.cache_dir = ""  # pyramid cache; "" = <data set folder>/.locnet_cache
  data.intensity = "mr"  # "mr" (percentile scaling), "ct" (Hounsfield window) or "none"
  data.ct_window_hu = (-1000.0, 1000.0)
  # the model's input outside the image: 0 (as dark as air), or < 0 to mark where the image ends (a partial
  # field of view is then visible to the model: docs/design.md, "Where the image ends"); needs data.intensity != "none"
  data.outside_value = 0.0
  data.spacings_mm = (4.0, 2.0, 1.0, 0.5)  # pyramid levels, coarse to fine, isotropic mm (paper)
  data.finest_size = 448  # finest grid size in voxels (448 x 0.5 mm = 224 mm field of view, paper)
  data.num_landmarks = 2  # K for synthetic data (a data set's manifest names its own landmarks)
  data.num_train = 16  # synthetic cases for training
  data.num_val = 4  # synthetic cases for validation

  config.model = model = ml_collections.ConfigDict()
  # "multiscale": the paper's model (num_scales = len(data.spacings_mm)); "single_scale": one Loc-Net on
  # the whole volume (data.spacings_mm has one entry); "heatmap": the heatmap-regression U-Net baseline
  model.kind = "multiscale"
  model.patch_size = 56  # patch edge in voxels for every scale after the first (paper: 56)
  model.com_kind = "relu"  # centre-of-mass weights: "relu" (paper) or "softmax"
  model.coarse_com_kind = ""  # the coarsest scale's, "" = model.com_kind
  # the finer scales' U-Nets conditioned on the landmark each patch is for (per-landmark scale and shift
  # after every normalisation, zero at init: a plain model's export warm-starts it unchanged)
  model.landmark_film = False
  # a learnt RAS mm offset per scale and landmark added to each prediction (zero at init): the fixed
  # per-landmark bias a shift-equivariant U-Net cannot express (docs/design.md)
  model.landmark_offset = False
  # training only: half-widths (mm) of a random shift of each intermediate finer scale's centre (scales
  # 1 .. S-2, e.g. (16.0, 8.0) for 8/4/2/1 mm), so it learns to correct a coarser scale's miss; () = none
  model.train_shift_mm = ()
  model.coarse_depth = 0  # the coarsest scale's U-Net depth (a receptive field over the whole grid); 0 = unet.depth
  model.finest_channels = 0  # the finest scale's U-Net base channels (the scale that sets the accuracy); 0 = unet.base_channels
  model.noise_mm = 5.0  # uniform shift U(-r, r) mm per axis before the finest crop (paper: 5)
  model.stop_gradient = False  # True: no gradient between scales (the multi-step baseline)
  model.extra_levels = 1  # "single_scale": U-Net levels added to unet.depth (paper, footnote 2)
  model.heatmap_sigma_mm = 6.0  # "heatmap": std of the Gaussian target blobs (paper: 6 mm)
  # "heatmap": height of the target blobs. With 1, an all-zero output wins the L2 loss (measured:
  # docs/design.md); the arg-max prediction does not depend on the scale
  model.heatmap_peak = 100.0
  # "multiscale": independent U-Net calls the finer scales' patches are split into (speed only, same function):
  # 0 = auto (one per patch, at most 8, on CPUs; 1 on GPUs; locnet_jax/model/locnet.py resolve_patch_groups)
  model.patch_groups = 0
  # "multiscale": also learn, per landmark, whether it is in the image (a logit from the heatmaps' mass,
  # locnet_jax/model/presence.py Presence), trained on the field-of-view crops of train.augmentation; measured
  # to carry no signal (docs/results.md). Prediction reads presence from the image's field of view without it
  # (locnet_jax/eval/qc.py); with it, the learnt probability multiplies in
  model.presence = False
  # what the presence logit reads: "mass" (above) or "image", its own small classifier of the coarsest volume
  # (locnet_jax/model/presence.py PresenceEncoder; measured: it tells a partial image from a whole head, not
  # which landmarks a slab holds, docs/results.md)
  model.presence_from = "mass"
  model.unet = unet = ml_collections.ConfigDict()
  unet.depth = 2  # down-samplings per U-Net (input sizes must be divisible by 2**depth)
  unet.base_channels = 16  # channels at full resolution
  unet.channel_growth = 2.0  # channel multiplier per level
  unet.convs_per_level = 2  # conv -> norm -> activation blocks per level
  unet.kernel_size = 3
  unet.norm = "instance"  # "none", "group" or "instance" (instance learned faster: docs/design.md)
  unet.norm_groups = 8  # groups for norm="group"
  unet.activation = "relu"  # relu, leaky_relu, elu, gelu, silu
  unet.downsample = "max"  # "max", "max_blur" (anti-aliased, Zhang 2019) or "blur"
  unet.upsample = "nearest"  # "nearest", "linear" or "transpose"
  unet.head_bias_init = 0.0  # initial bias of the heatmap layer
  # "auto" (2-D-slice convolutions on CPU, lax's 3-D ones elsewhere), "xla" or "as_2d": speed only,
  # same parameters and function (see locnet_jax/model/unet.py and benchmarks/conv_impl.py)
  unet.conv_impl = "auto"
  # compute dtype, "float32" or "bfloat16" (GPU tensor cores; parameters and heatmaps stay float32).
  # bfloat16 on XLA:CPU is slower than float32; measured on GPU in docs/performance.md
  unet.dtype = "float32"

  config.train = train = ml_collections.ConfigDict()
  train.num_epochs = 500  # paper: 500 (the loss-weight schedule spans exactly these epochs)
  train.learning_rate = 5e-4  # Adam (paper: 5e-4)
  train.lr_schedule = "constant"  # "constant" (paper) or "cosine" (from learning_rate down to 0 over the run)
  train.warmup_epochs = 0  # "cosine" only: epochs of a linear rise from 0 to learning_rate first (continued runs)
  # fine-tuning: an exported model folder (export_model.py) whose parameters start the run; what it lacks
  # (e.g. the presence output) starts from the seed's init. Several, comma-separated: each gives the
  # parameters the ones before it lacked (e.g. "a_model,a_presence_reader"). Read only when the workdir is new.
  train.init_from = ""
  # parameter paths (prefixes, comma-separated, e.g. "scale3") that keep the seed's init instead of
  # init_from's: a scale whose size changed (model.finest_channels) trains afresh under the warm-started rest
  train.init_skip = ""
  train.batch_size = 1  # volumes per step (paper: 1)
  # "paper": all scales together, weights scheduled per epoch (losses.loss_weights); "multistep": one
  # scale at a time, coarse first, equal shares of the epochs, the others frozen (Table 1 baseline);
  # "flat": every scale weight 1 in every epoch (fine-tuning a trained model: the paper's schedule starts
  # from the coarse scale alone, which undoes the finer scales' training)
  train.schedule = "paper"
  train.noise = True  # inject noise before the finest crop while training (paper's best model)
  train.augment = True  # random rotation/scale/translation and intensity changes (real data only)
  # what the augmentation draws (locnet_jax/data/augment_host.py AugmentSettings: each field's meaning there).
  # The "variation" fields (deform_mm and after) model other individuals, contrasts and fields of view; the
  # host and the device implement the same draws (all but elastic_mm, host only)
  train.augmentation = aug = ml_collections.ConfigDict()
  aug.max_rotation_deg = 10.0
  aug.max_scale = 0.05
  aug.max_translation_mm = 10.0
  aug.max_gamma = 0.2
  aug.max_intensity_scale = 0.1
  aug.max_intensity_shift = 0.05
  aug.noise_std = 0.01
  aug.elastic_mm = 0.0
  aug.deform_mm = 0.0
  aug.deform_spacing_mm = (20.0, 60.0)
  aug.max_axis_scale = 0.0
  aug.lut_probability = 0.0
  aug.lut_knots = 8
  aug.max_bias_log = 0.0
  aug.max_blur_mm = 0.0
  aug.thick_probability = 0.0
  aug.max_thickness_mm = 6.0
  aug.fov_probability = 0.0
  aug.fov_slab_probability = 0.5
  aug.fov_min_mm = 40.0
  aug.fov_shift_mm = 40.0
  aug.finest_margin_mm = 0.0  # > 0: the host computes the finest level only this near the landmarks (speed)
  train.presence_weight = 1.0  # weight of the presence cross-entropy in the loss (model.presence=True)
  # True: a finer scale's squared error counts only for the landmarks inside its input patch (a patch
  # that missed its landmark, as after a poor coarse guess on a field-of-view crop, has nothing to learn it
  # from; locnet_jax/model/losses.py in_patch). False: the paper's loss over every landmark
  train.loss_in_patch_only = False
  train.loader_workers = 1  # background processes preparing augmented batches (0: inline)
  # where augmentation runs: "host" (the loader's workers, scipy; elastic possible), "device" (in JAX on the
  # accelerator, locnet_jax/data/augment_device.py: a GPU fed at paper size), "auto" (host on CPUs, else device)
  train.augment_on = "auto"
  # where the training set lives: "host" (the loader reads the cache each step), "device" (all of it on the
  # device, float16 for cached data, batches gathered there: no host work per step; locnet_jax/data/resident.py;
  # needs augment_on="device" or augment=False), "auto" (device on an accelerator when augmentation is on
  # the device and the set takes at most half its memory, else host)
  train.data_on = "auto"
  # batch_size is global: split over the local devices that divide it (data parallel, parameters
  # replicated); True: jax.distributed.initialize() first, for several hosts (cluster from the environment)
  train.distributed = False

  config.eval = ev = ml_collections.ConfigDict()
  ev.split = "test"  # the manifest split evaluate.py scores
  ev.checkpoint = "best"  # "best" (lowest validation error) or "latest"
  ev.num_noise_samples = 50  # test-time passes with different noise (paper: 50); 0: one deterministic pass
  # noise samples computed at once inside the one jitted call (bounds memory); 0 = auto
  # (inference.auto_chunk_size: 1 on CPUs, where it is fastest, 10 elsewhere)
  ev.chunk_size = 0
  ev.out_dir = ""  # "" = <workdir>/eval/<split>; replaced as a whole when the new results are complete
  # split whose cases fit a scale for the noise samples' std (90 % coverage there), applied to `split` as
  # a second, calibrated coverage ("" = none); the raw coverage is always reported too
  ev.calibrate_split = "val"
  ev.figures = True  # fig3_slices.png, fig4_errors.png, fig5_confidence.png
  ev.compare_workdirs = ""  # comma-separated other workdirs (already evaluated) for the violin plot
  return config
