"""Time TRL's on-policy distillation trainers (CPU, or CUDA with --gpu), as a baseline for distill's own trainer.

Runs `--warmup + --steps` optimizer steps of either
  * `gkd`:          trl.experimental.gkd.GKDTrainer (generalized JSD, student samples with prob. lmbda), or
  * `distillation`: trl.DistillationTrainer (trl/trainer/distillation_trainer.py; always on-policy, chunked JSD),
and measures, per optimizer step (TrainerCallback on_step_begin -> on_step_end, time.perf_counter), the wall time
of: student generation + student/teacher forward + loss + backward + grad clip + optimizer step. The first
`--warmup` steps are not timed; the median of the rest is reported, with peak RSS (ru_maxrss) and the number of
completion tokens the student generated per step (counted by wrapping `student.generate`; tokens up to and
including the first EOS).

Inputs are plain-text prompts, no chat template: the ids fed to the model are exactly
`tokenizer(prompt, add_special_tokens=False).input_ids` (checked at startup). fp32, CPU, batch = one prompt batch
per optimizer step (gradient_accumulation_steps=1), prompts in file order. By default EOS is suppressed with
`min_new_tokens = max_new_tokens`, so every completion is exactly --max-new-tokens long.

Needs an environment with `trl` (not a distill dependency), e.g.
    /tmp/bench-trl/bin/python benchmarks/trl_baseline.py --trainer gkd --teacher T --student S --prompts P.jsonl
(benchmarks/on_policy.py prepares T, S and P and runs this script for you)
The last stdout line is `RESULT {json}`; everything else goes to stderr.
"""

import argparse
import contextlib
import json
import resource
import statistics
import sys
import tempfile
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trainer", choices=["gkd", "distillation"], required=True)
    p.add_argument("--teacher", help="teacher folder (CPU setting)")
    p.add_argument("--student", help="student folder (CPU setting)")
    p.add_argument("--prompts", required=True, help='JSONL rows {"prompt": text}')
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--lmbda", type=float, default=1.0, help="GKD only (DistillationTrainer is always on-policy)")
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps before them")
    p.add_argument("--gradient-checkpointing", type=int, choices=[0, 1], default=0)
    p.add_argument("--force-length", type=int, choices=[0, 1], default=1, help="suppress EOS (min_new_tokens)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = leave the machine default")
    p.add_argument("--gpu", action="store_true", help="CUDA, bf16, random-init Qwen2.5-1.5B / 0.5B shapes")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (TrainingArguments.bf16), also on CPU")
    p.add_argument("--tokenizer", default=None, help="--gpu: the tokenizer folder (on_policy.py writes one)")
    p.add_argument("--teacher-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="CPU setting: the teacher's weights (bfloat16: a bf16 copy, as distill's teacher.dtype)")
    p.add_argument("--freeze-embeddings", action="store_true",
                   help="the student's input embeddings (tied to its lm_head) get no gradient, as distill's "
                        "train.freeze_embeddings")
    args = p.parse_args()
    if args.gpu and not args.tokenizer or not args.gpu and not (args.teacher and args.student):
        p.error("the CPU setting needs --teacher and --student; --gpu needs --tokenizer")
    return args


def main(a):
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, set_seed

    if a.trainer == "distillation" and not hasattr(trl, "DistillationTrainer"):
        print(f"trl {trl.__version__} has no DistillationTrainer", file=sys.stderr)
        sys.exit(3)
    if a.threads:  # on a shared CPU, oversubscribed OpenMP threads can slow this down many times over
        torch.set_num_threads(a.threads)
    set_seed(a.seed)  # python random (GKD's lmbda coin), numpy, torch
    print(f"trl {trl.__version__}, torch {torch.__version__}, threads {torch.get_num_threads()}", file=sys.stderr)

    tok = AutoTokenizer.from_pretrained(a.tokenizer if a.gpu else a.student)
    with open(a.prompts) as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
    prompts = prompts[: a.batch * (a.warmup + a.steps)]
    ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    # DistillationTrainer tokenizes the raw "prompt" string itself with `tokenizer(text=prompts)` (default
    # add_special_tokens=True). That only gives the raw ids if this tokenizer adds no special tokens: check it.
    assert all(tok(p).input_ids == i for p, i in zip(prompts, ids)), "tokenizer adds special tokens"

    if a.gpu:  # the shapes of on_policy.py, random init (speed does not depend on the values)
        from on_policy import QWEN_05B, QWEN_15B
        from transformers import AutoConfig

        def shape(cfg, seed):
            torch.manual_seed(seed)
            extra = {k: v for k, v in cfg.items() if k != "model_type"}
            ids = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
            return AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg["model_type"], **extra, **ids), dtype=torch.bfloat16)

        student, teacher = shape(QWEN_05B, a.seed), shape(QWEN_15B, a.seed + 1)
    else:
        student = AutoModelForCausalLM.from_pretrained(a.student, dtype=torch.float32)
        teacher = AutoModelForCausalLM.from_pretrained(a.teacher, dtype=getattr(torch, a.teacher_dtype))
    if a.freeze_embeddings:  # the Trainer's optimizer takes only parameters that require grad
        student.get_input_embeddings().weight.requires_grad_(False)
    eos = tok.eos_token_id

    # Count the completion tokens the student generates (both trainers call `generate` on the student itself).
    gen_tokens = [0]
    orig_generate = student.generate

    def counting_generate(*args, **kwargs):
        out = orig_generate(*args, **kwargs)
        seqs = out.sequences if hasattr(out, "sequences") else out
        comp = seqs[:, kwargs["input_ids"].shape[1]:]
        is_eos = comp == eos
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, comp.shape[1])  # incl. the EOS
        gen_tokens[0] += int(first.sum())
        print(f"  generate: {tuple(kwargs['input_ids'].shape)} -> {comp.shape[1]} new, lengths {first.tolist()}",
              file=sys.stderr)
        return out

    student.generate = counting_generate

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.tokens = [], []

        def on_step_begin(self, args, state, control, **kw):
            gen_tokens[0] = 0
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)
            self.tokens.append(gen_tokens[0])
            print(f"step {len(self.times)}: {self.times[-1]:.2f}s, {gen_tokens[0]} generated tokens", file=sys.stderr)

    timer = Timer()
    common = dict(
        output_dir=tempfile.mkdtemp(prefix="trl_baseline_"), max_steps=a.warmup + a.steps,
        per_device_train_batch_size=a.batch, gradient_accumulation_steps=1, learning_rate=a.lr,
        lr_scheduler_type="constant", gradient_checkpointing=bool(a.gradient_checkpointing), bf16=a.gpu or a.bf16, fp16=False,
        use_cpu=not a.gpu, seed=a.seed, report_to="none", save_strategy="no", eval_strategy="no",
        logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, temperature=a.temperature, beta=a.beta,
    )
    if a.trainer == "gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer
        from trl.trainer.utils import pad

        # GKD's default collator (DataCollatorForChatML) builds prompts from a chat template / "messages". We feed
        # the raw prompt ids instead: GKD only needs `prompts`/`prompt_attention_mask` (left padded) for on-policy
        # generation, and input_ids/attention_mask/labels for the (lmbda < 1) off-policy branch, which here has no
        # completion (all labels -100, so that branch contributes no loss).
        def collate(rows):
            p = [torch.tensor(r["prompt_ids"]) for r in rows]
            p_ids = pad(p, padding_value=tok.pad_token_id, padding_side="left")
            p_mask = pad([torch.ones_like(x) for x in p], padding_value=0, padding_side="left")
            return dict(input_ids=p_ids, attention_mask=p_mask, labels=torch.full_like(p_ids, -100),
                        prompts=p_ids, prompt_attention_mask=p_mask)

        class PromptOnlyGKD(GKDTrainer):
            # transformers counts `num_items_in_batch` from the dataloader's labels, before GKD replaces them with
            # the generated completions; GKD then divides the JSD sum by it. Our prompt-only batches have no label
            # tokens (count 0 -> inf/NaN loss), so return None: GKD then averages over the generated tokens, the
            # same normalisation DistillationTrainer uses (it recounts after generation).
            def _get_num_items_in_batch(self, batch_samples, device):
                return None

        config = GKDConfig(**common, lmbda=a.lmbda, max_new_tokens=a.max_new_tokens,
                           train_sampling_strategy="sequential")  # file order
        trainer = PromptOnlyGKD(model=student, teacher_model=teacher, args=config, data_collator=collate,
                             train_dataset=Dataset.from_dict({"prompt_ids": ids}), processing_class=tok,
                             callbacks=[timer])
        if a.force_length:  # GKDConfig has no generation_kwargs; its GenerationConfig is passed to generate()
            trainer.generation_config.min_new_tokens = a.max_new_tokens
    else:
        if a.lmbda != 1.0:
            print("note: --lmbda is ignored, DistillationTrainer is always on-policy", file=sys.stderr)
        config = trl.DistillationConfig(
            **common, max_completion_length=a.max_new_tokens, shuffle_dataset=False,  # file order
            generation_kwargs={"min_new_tokens": a.max_new_tokens} if a.force_length else None)
        trainer = trl.DistillationTrainer(model=student, teacher_model=teacher, args=config,
                                          train_dataset=Dataset.from_dict({"prompt": prompts}),
                                          processing_class=tok, callbacks=[timer])
    print(f"generation config: {trainer.generation_config.to_diff_dict()}", file=sys.stderr)
    print(f"optimizer: {config.optim}, max_grad_norm {config.max_grad_norm}", file=sys.stderr)
    trainer.train()

    timed, tokens = timer.times[a.warmup:], timer.tokens[a.warmup:]
    s_per_step = statistics.median(timed)
    return dict(
        trainer=a.trainer, trl_version=trl.__version__, bf16=a.gpu or a.bf16, gradient_checkpointing=a.gradient_checkpointing,
        teacher_dtype=a.teacher_dtype, freeze_embeddings=a.freeze_embeddings,
        batch=a.batch, max_new_tokens=a.max_new_tokens, steps_timed=len(timed), s_per_step=s_per_step,
        samples_per_s=a.batch / s_per_step, gen_tokens_per_step=statistics.mean(tokens),
        peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
        peak_gpu_gib=torch.cuda.max_memory_allocated() / 2**30 if a.gpu else None,
        step_times=timed,
    )


if __name__ == "__main__":
    args = parse_args()
    with contextlib.redirect_stdout(sys.stderr):  # Trainer/TRL may print to stdout; keep it for RESULT only
        result = main(args)
    print("RESULT " + json.dumps(result))
