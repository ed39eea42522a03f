"""Every config field of aapt_jax, documented in one place.

Variants (`tiny.py`, `atari.py`, `wan2_1_1_3b.py`, `aapt_8b.py`) import this
file and override fields; no default hides in code. Load a config with
`aapt_jax.load_config("configs/atari.py", {"model.dim": 72})` or, in launch
scripts, `--config=configs/atari.py --config.model.dim=72`.
"""
import ml_collections


def _optim(**overrides):
  """An optimizer section (optax, from training/optimizers.py)."""
  o = ml_collections.ConfigDict()
  o.name = "adamw"            # adamw | rmsprop
  o.learning_rate = 1e-5      # peak learning rate
  o.schedule = "constant"     # constant | cosine (decays to 0 at train.steps)
  o.hold_steps = 0            # steps at learning rate 0 before the warm-up (e.g. G
                              # waits while a fresh discriminator learns)
  o.warmup_steps = 0          # linear warm-up from 0
  o.b1 = 0.9                  # adamw
  o.b2 = 0.999                # adamw
  o.eps = 1e-8
  o.weight_decay = 0.0        # adamw decoupled weight decay
  o.rms_decay = 0.9           # rmsprop's alpha (paper stage 3: 0.9)
  o.grad_clip = 1.0           # global-norm clip; 0 = off
  o.update(overrides)
  return o


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()

  # Which training stage to run: "vae", "diffusion", "consistency",
  # "adversarial", or "pipeline" (all stages in order, as the main job runs).
  c.stage = "diffusion"
  # Where the stage starts from (a run, stage, step, export or convert_weights
  # dir, or a shipped export's name such as "atari": an export holds the EMA
  # generator only); "" = the previous stage's directory in the same workdir.
  c.init_from = ""
  # Where the discriminator starts from (stage 3; the same kinds of source);
  # "" = the stage-1 dir.
  c.disc_init_from = ""
  # A rerun resumes from the stage's latest checkpoint and refuses when the
  # config changes what the run trains (optimizer, schedule, seed, data,
  # model, objectives; training/resume_check.py lists the harmless fields:
  # logging, checkpointing, mesh, ...). True = resume anyway, recording the
  # diff in <workdir>/config_changes.json.
  c.resume_with_changes = False

  # ------------------------------------------------------------------ model
  m = c.model = ml_collections.ConfigDict()
  m.dim = 256                 # hidden size D
  m.num_layers = 8            # transformer blocks
  m.num_heads = 4             # attention heads; head dim = dim / num_heads
  m.ffn_dim = 1024            # MLP hidden size
  m.freq_dim = 256            # sinusoid size of the timestep embedding (Wan: 256)
  m.text_dim = 0              # text embedding size; 0 = no text cross-attention
  m.latent_channels = 16      # C of a latent frame
  m.patch_size = (1, 2, 2)    # (t, h, w) patch of the patch embed; t must be 1
                              # when block_causal (one latent frame per block)
  m.latent_size = (16, 16)    # (h, w) of a latent frame, for the KV cache
  m.window_frames = 8         # N: previous blocks kept besides the sink
  m.num_actions = 0           # discrete action vocabulary; 0 = none
  m.control_dim = 0           # continuous control vector size; 0 = none
  m.block_causal = True       # AAPT attention (sink + window); False = plain
                              # Wan bidirectional attention over all frames
  m.frame_recycling = True    # input = concat(noisy x_i, x_{i-1}) on channels
  m.qk_norm = True            # RMSNorm over all heads on q and k (Wan)
  m.cross_attn_norm = True    # affine LayerNorm before cross-attention (Wan)
  m.eps = 1e-6                # norm epsilon (Wan)
  m.rope_theta = 10000.0      # RoPE base per axis (Wan)
  m.dtype = "float32"         # compute dtype: float32 | bfloat16
  m.param_dtype = "float32"   # parameter dtype
  m.scan_layers = True        # run blocks under nn.scan (one compiled layer)
  m.remat = "none"            # jax.checkpoint policy per block: none | full |
                              # dots_saveable | dots_with_no_batch_dims_saveable
  m.attention_backend = "xla"  # xla (every device) | cudnn (GPU with bf16/fp16 only: the
                              # streaming step's attention as cuDNN's fused kernel) |
                              # splash (TPU only: the training call's block-causal
                              # attention as one Pallas splash kernel). cudnn and splash
                              # are UNVERIFIED on their devices so far (tested on CPU)
  # What the output head predicts: "velocity" (Wan, flow matching's v = eps - x0),
  # "x0" (the clean frame), or "frame_delta" (x0 - x_{i-1}: the change from the
  # recycled frame, added back in the generator). x0 becomes v = (x_t - x0) /
  # max(t, x0_min_t), so every objective and sampler still sees a velocity. x0
  # suits a narrow model with wide tokens: predicting v means carrying the input
  # noise through the whole residual stream to cancel it (Li & He 2025, "Back to
  # Basics"); frame_delta also spares it carrying the previous frame through.
  m.prediction = "velocity"
  m.x0_min_t = 0.05           # clamp of t in the x0 -> velocity conversion

  # ------------------------------------------------------------------ train
  t = c.train = ml_collections.ConfigDict()
  t.steps = 1000              # optimizer steps of the stage
  t.batch_size = 8            # global batch size (samples)
  t.seed = 0                  # seeds params, data order, noise
  t.clip_frames = 8           # latent frames per training clip
  t.ema_decay = 0.995         # EMA of the generator's params (paper: 0.995); warmed
                              # up as min(decay, (1 + step) / (10 + step))
  t.log_every = 10            # steps between metric writes (TensorBoard + console)
  t.max_nonfinite = 5         # stop after this many non-finite losses in a row
  t.profile_steps = 0         # > 0: a JAX profiler trace of this many steps (from the
                              # second step run) into <workdir>/<stage>/tb (TensorBoard's
                              # profile tab); launch/train.py --profile_steps=N
  t.peak_flops_per_device = 0.0  # for perf/mfu; 0 = a known accelerator's bfloat16 peak
                              # when model.dtype is bfloat16, else no MFU

  # ------------------------------------------------ stage 1: diffusion adaptation
  df = c.diffusion = ml_collections.ConfigDict()
  df.timestep_shift = 3.0     # t' = s t / (1 + (s - 1) t), per latent frame
  df.cond_dropout = 0.1       # per sample: drop actions/controls/text (for CFG)
  df.context_noise = 0.0      # noise on the recycled frames: + sigma * eps, sigma ~
                              # U[0, context_noise] per frame (0 = clean frames)
  df.change_weight = 0.0      # loss weight 1 + change_weight on the latent elements
  df.change_threshold = 0.02  # that changed by more than this since the previous
                              # frame (|x_i - x_{i-1}|; pixel worlds: [-1, 1] colour)
  df.loss_space = "velocity"  # "velocity": MSE of v (an x0 head's error / t^2, so the
                              # low-noise steps dominate); "x0": MSE of the clean frame
                              # x_t - t v (every noise level alike)
  df.optim = _optim(name="adamw", learning_rate=1e-5)  # paper: AdamW, lr 1e-5
  df.sampler_steps = 0        # forwards per latent frame this stage-1 model streams
                              # with (0 = 16 Euler steps); launch/export.py
                              # --sampler_steps=1 ships one that plays at one forward

  # ------------------------------------------------------------- checkpoint
  k = c.checkpoint = ml_collections.ConfigDict()
  k.every_steps = 500         # save every so many steps (and at the end)
  k.keep = 3                  # checkpoints kept

  # ------------------------------------------------------------------- data
  d = c.data = ml_collections.ConfigDict()
  d.path = ""                 # directory of ArrayRecord files
  d.world = ""                # simulator of the embedded world: "atari" | ""
  d.game = ""                 # the world's game (Atari: "Pong", "Breakout", ...)
  d.frame_size = 64           # square frame size of the world's video
  d.frame_skip = 4            # emulator frames per recorded frame
  d.space_to_depth = 4        # pixel-space model: frames -> latents by s x s
                              # space-to-depth (0 = latents come from a VAE)
  d.text_len = 512            # caption tokens per sample (model.text_dim > 0): the records'
                              # text_embedding padded/truncated to it, with a mask, and a
                              # caption StreamingSession.start(text="...") encodes (Wan: 512)
  d.record_episodes = 8       # with data.world set and data.path empty, the trainer
  d.record_frames = 500       # records this many episodes of at most this many frames
  d.policy = ""               # ...played by this recording policy: "" = the world's own
                              # (sticky_random; doom: explorer), "rally" (Pong: keeps the
                              # ball in play, so the data shows rallies)
  d.text_encoder = ""         # the umT5 folder that turns captions into the text
                              # embeddings (a transformers UMT5EncoderModel, e.g.
                              # Wan2.1-T2V-1.3B-Diffusers/text_encoder, its tokenizer/
                              # beside it); StreamingSession.start(text="...") encodes with
                              # it; "" = none (text only as precomputed embeddings)

  # --------------------------------------------- stage 2: consistency distillation
  cs = c.consistency = ml_collections.ConfigDict()
  cs.num_steps = 32           # teacher ODE steps of the discretised schedule (paper: 32)
  cs.shift = 24.0             # timestep shift of that schedule (paper: 24, at ~1200
                              # tokens per frame); its first teacher step is from
                              # t = shift / (K + shift - 1) (0.44 at 24): scale it down
                              # for fewer tokens (configs/atari.py: 3, stage 1's shift)
  cs.distance = "l2"          # l2 | pseudo_huber
  cs.huber_c = 0.03           # pseudo-Huber constant
  cs.optim = _optim(name="adamw", learning_rate=1e-5)

  # -------------------------------------------------------------------- vae
  # The causal video VAE (models/vae.py), in Wan2.1's layout; these defaults
  # are Wan2.1's VAE: r = 2^(True flags) = 4 frames per latent frame (after
  # the first), s = 2^(len(dim_mult) - 1) = 8 pixels per latent pixel. A
  # latent frame is model.latent_size x z_dim (the decode cache's shape).
  v = c.vae = ml_collections.ConfigDict()
  v.base_dim = 96             # channels of the first level
  v.z_dim = 16                # latent channels C
  v.dim_mult = (1, 2, 4, 4)   # channel multiplier per level
  v.num_res_blocks = 2        # residual blocks per encoder level (decoder: +1)
  v.attn_scales = ()          # must be (): Wan2.1 has attention in the mid blocks only
  v.temperal_downsample = (False, True, True)  # temporal halving per downsample
                              # (diffusers' spelling); the decoder mirrors it
  v.dropout = 0.0             # must be 0.0 (as Wan)
  v.dtype = "float32"         # compute dtype: float32 | bfloat16
  v.checkpoint = ""           # the stage-"vae" run/step directory whose encoder made
                              # this config's latent records (prepare_data
                              # --vae_checkpoint) and whose decoder streams its frames
  # Per-channel statistics of the raw latents (Wan2.1's): the DiT sees
  # (latents - mean) / std (models/vae.py normalize_latents).
  v.latents_mean = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
  v.latents_std = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                   3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
  # Stage "vae" (training/vae_stage.py): loss = sum of weight x term, each
  # term a mean over its elements (objectives/vae.py): |x - x'|, (x - x')^2,
  # |grad x - grad x'| of neighbouring pixels, the squared error of each
  # frame's worst `hard_fraction` of pixels, KL to N(0, I) per latent element.
  v.l1_weight = 1.0
  v.l2_weight = 0.0
  v.grad_weight = 0.0
  v.hard_weight = 0.0
  v.hard_fraction = 0.02
  v.kl_weight = 1e-6
  v.optim = _optim(name="adamw", learning_rate=1e-4)

  # ------------------------------------------------------------ distributed
  ds = c.distributed = ml_collections.ConfigDict()
  ds.initialize = False       # call jax.distributed.initialize (multi-host)
  ds.coordinator_address = ""  # "host:port"; "" = the platform's autodetection
  ds.num_processes = 1
  ds.process_id = 0
  ds.heartbeat_timeout_s = 0  # 0 = JAX's default (100 s); tests use a few seconds
  ds.from_slurm = True        # under srun with several tasks: initialize from SLURM's env

  # ------------------------------------------------------------------- mesh
  # Device mesh axes; their product must equal the number of devices.
  # -1 on one axis = all remaining devices.
  me = c.mesh = ml_collections.ConfigDict()
  me.data = -1
  me.fsdp = 1
  me.tensor = 1
  # Logical axis -> mesh axes: (logical name, mesh axis, a tuple of mesh axes,
  # or None = replicated) pairs, one for every logical name (aapt_jax/parallel.py
  # has the glossary). Applied once, where training/program.py builds the
  # train program: to the state's shardings and, while the step is traced,
  # to the activations' logical constraints.
  me.logical_axis_rules = (
      # activations
      ("batch", ("data", "fsdp")),  # samples
      ("frames", None),             # latent frames
      ("tokens", None),             # tokens inside a frame
      ("act_embed", None),          # the residual stream's width (FSDP shards the batch)
      # parameters
      ("embed", "fsdp"),            # the model width D
      ("embed_out", None),          # a D x D matrix's second D axis
      ("heads", "tensor"),          # attention width (heads x head dim) of q/k/v/out
      ("mlp", "tensor"),            # MLP hidden width, the 6·D modulation projection
      ("freq", None),
      ("text_embed", None),
      ("vocab", None),
      ("control", None),
      ("modulation", None),
      ("patch_t", None),
      ("patch_h", None),
      ("patch_w", None),
      ("channels", None),
      ("patch_out", None),
      ("layers", None),             # the stacked axis of scanned blocks
      ("logit", None),
      ("vae_t", None),
      ("vae_h", None),
      ("vae_w", None),
      ("vae_in", None),
      ("vae_out", "fsdp"),          # a VAE conv's output channels
      ("vae_norm", None),
      ("rgb", None),
  )

  # ------------------------------------------------------------ adversarial
  a = c.adversarial = ml_collections.ConfigDict()
  a.forcing = "student"             # "student": G plays its own frames (AAPT).
                                     # "teacher": G makes each frame of a real clip
                                     # from the real previous frames (the paper's
                                     # Fig. 7 ablation; rollout_* fields unused)
  a.gradient = "recompute"          # "recompute" (parallel re-run) | "scan"
  a.segment_gradient = "end_to_end"  # "end_to_end" | "truncated"
  a.disc_noise_input = False         # False: D judges clean frames at t = 0. True:
                                     # frames noised at a per-sample t ~ U[0, 1] (the
                                     # recycled slot too); x and x + σε (R1/R2) share
                                     # one diffusion-noise draw
  a.disc_head_layers = ()            # blocks the logit heads read; () = 3 spread depths
  a.disc_clips_per_forward = 0       # clips (per sample) in one D forward; 0 = all the
                                     # step's clips in one. > 0: the forwards run one after
                                     # another, rematerialised (memory of one forward, one
                                     # more D forward); the same logits
  a.rollout_frames = 16              # L: latent frames of the student-forcing rollout
  a.segment_frames = 8               # S: frames per judged segment (paper: 10 s)
  a.segment_overlap = 1              # O: overlap of consecutive segments (paper: 1 s)
  a.r1_weight = 1000.0               # λ of approximate R1 (reals) and R2 (fakes) (APT)
  a.r1_sigma = 0.1                   # σ of their input perturbation (APT); frame 0
                                     # of segment 0 (the real start frame) is in no
                                     # loss, nor in R1/R2
  a.rollout_mse_weight = 0.0         # > 0 (not the paper): G's loss adds this times the
                                     # squared error of the rollout against the episode's
                                     # real frames from the same start under the same
                                     # conditions (worlds that replay them exactly)
  a.gen_optim = _optim(name="rmsprop", learning_rate=3e-6, rms_decay=0.9)  # paper
  a.disc_optim = _optim(name="rmsprop", learning_rate=3e-6, rms_decay=0.9)

  p = c.pipeline = ml_collections.ConfigDict()  # stage="pipeline": 1 -> 2 -> 3 -> sample
  p.diffusion_steps = 0       # each stage's train.steps; 0 = train.steps
  p.consistency_steps = 0
  p.adversarial_steps = 0
  p.sample_frames = 48        # latent frames of <workdir>/sample.mp4; 0 = none
  return c
