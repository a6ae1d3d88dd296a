"""minifastv as an lmms-eval model: every lmms-eval task (POPE, TextVQA, GQA, MME, ...) on
LLaVA-1.5, with FastV or another pruning rule, or without.

    python -m lmms_eval --model minifastv --tasks pope --batch_size 8 --output_path results/ \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,k=2,r=0.5,rule=fastv

Model arguments (--model_args, comma-separated):
  pretrained  a hub repo id (default llava-hf/llava-1.5-7b-hf), a llava-hf model folder, or tiny
  k, r        FastV's first pruned layer and share of image tokens dropped (default 2 and 0.5);
              r=0 runs the model without FastV: the baseline
  rule        fastv (default), random, grid, no_rope, or path/to/file.py:function, as in
              python -m minifastv.eval --rule
  device, dtype   as minifastv.load chooses them by default; dtype float16, bfloat16 or float32
  crop        True: llava-hf's center crop; by default each image is padded to a square, as
              LLaVA-1.5's own evaluation does
  max_new_tokens  for tasks that set none (1024, as lmms-eval's llava model)
--batch_size N answers N questions at once, left-padded (give it there, not in --model_args).

lmms-eval's protocol for each task stays as it is: its prompt text, generation settings and
scoring. Around the task's text goes the conversation LLaVA-1.5 was evaluated with, vicuna_v1 with
its system prompt, as in lmms-eval's `llava` model (the original LLaVA code) that FastV's own
lmms-eval numbers used; lmms-eval's `llava_hf` model takes llava-hf's chat template, which has none.
Decoding is greedy unless a task sets a temperature above 0 (then it samples, as lmms-eval's llava
models do); a task's stop strings ("until") cut the answer.

Under `accelerate launch --num_processes N -m lmms_eval ...` every process loads its own copy on its
own GPU; lmms-eval deals the questions out to the processes and gathers the answers.

lmms-eval finds the model by the entry point group lmms_eval.models (pyproject.toml:
minifastv = "minifastv.lmms_eval_model:manifest"). Import this file only where lmms-eval is
installed: nothing in minifastv imports it.
"""

import json

from accelerate import Accelerator
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from PIL import Image
from tqdm import tqdm

from . import cli
from .checkpoint import load, read_config
from .errors import UsageError
from .rules import load_rule
from .generation import Sampling, generate
from .image import ImageProcessorConfig, preprocess
from .model import FastV
from .prompt import SYSTEM_PROMPTS, Tokenizer, encode_prompt, format_prompt, left_pad


def manifest():
    """What the entry point hands lmms-eval: the model's name and where its class is."""
    return ModelManifest(model_id="minifastv", simple_class_path=f"{__name__}.MinifastvLmms")


class MinifastvLmms(lmms):
    """minifastv's LLaVA-1.5 answering lmms-eval's generation requests (see the top of the file)."""

    def __init__(self, pretrained="llava-hf/llava-1.5-7b-hf", k=2, r=0.5, rule="fastv",
                 device=None, dtype="auto", crop=False, max_new_tokens=1024, batch_size=1,
                 max_batch_size=None):  # max_batch_size: lmms-eval's, for --batch_size auto
        super().__init__()
        self.accelerator = Accelerator()  # one process, or one of N under accelerate launch
        if self.accelerator.num_processes > 1:
            device = self.accelerator.device  # this process's own GPU
        self.device = cli.pick_device(str(device or "auto"))
        self._rank = self.accelerator.process_index  # lmms-eval's rank and world_size
        self._world_size = self.accelerator.num_processes
        if dtype not in cli.DTYPES:
            raise UsageError(f"dtype={dtype} is not one of {', '.join(cli.DTYPES)}.")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise UsageError(f"--batch_size {batch_size}: give a number of questions, 1 or more.")
        self.batch_size, self.max_new_tokens = int(batch_size), int(max_new_tokens)
        self.pad = not crop
        self.fastv = FastV(k, r, rule=load_rule(rule)) if r else None  # r=0: the baseline

        with self.accelerator.main_process_first():  # one process downloads, the others wait
            folder = cli.model_folder(str(pretrained))
        config = read_config(folder)
        if self.fastv and (k >= config.text.num_hidden_layers
                           or self.fastv.num_keep(config.image_tokens_per_image) == 0):
            raise UsageError(f"k={k}, r={r} does not fit {pretrained}: k must be below its "
                             f"{config.text.num_hidden_layers} layers and r keep an image token.")
        self.tokenizer = Tokenizer.from_folder(folder)
        self.image_config = ImageProcessorConfig.from_folder(folder)
        self.model = load(folder, self.device, cli.pick_dtype(dtype, self.device),
                          progress=self.rank == 0, towers=("image",))

    def loglikelihood(self, requests):
        raise NotImplementedError("minifastv answers generation tasks only (output_type "
                                  "generate_until); this task scores likelihoods.")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("minifastv answers one-turn generation tasks only.")

    def generate_until(self, requests):
        """The answers, in the requests' order. Each request's args: (context, gen_kwargs,
        doc_to_visual, doc_id, task, split). A batch holds requests of one task with the same
        generation settings, and runs as one generate() call per number of images in it."""
        groups = {}
        for index, request in enumerate(requests):
            _, settings, _, _, task, _ = request.args
            groups.setdefault((task, json.dumps(settings, sort_keys=True)), []).append(index)
        answers = [None] * len(requests)
        with tqdm(total=len(requests), desc="minifastv", disable=self.rank != 0) as progress:
            for indices in groups.values():
                for start in range(0, len(indices), self.batch_size):
                    batch = indices[start:start + self.batch_size]
                    questions = [self.question(*requests[index].args) for index in batch]
                    for count in sorted({len(images) for _, images in questions}):
                        rows = [row for row, (_, images) in enumerate(questions)
                                if len(images) == count]
                        texts = self.answer([questions[row] for row in rows],
                                            requests[batch[0]].args[1])
                        for row, text in zip(rows, texts):
                            answers[batch[row]] = text
                    progress.update(len(batch))
        return answers

    def question(self, context, settings, doc_to_visual, doc_id, task, split):
        """(input_ids (1, T), images) of one request: the task's text in LLaVA-1.5's conversation,
        "<image>\\n" in front for each image unless the text places them."""
        images = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        if not all(isinstance(image, Image.Image) for image in images):
            raise NotImplementedError(f"minifastv's lmms-eval model reads images only; task {task} "
                                      "gives videos or sound.")
        text = format_prompt(context, num_images=len(images), system=SYSTEM_PROMPTS["vicuna_v1"])
        ids = encode_prompt(self.tokenizer, text, self.model.config.image_tokens_per_image)
        return ids, images

    def answer(self, questions, settings):
        """Answers to questions with as many images each, at once: left-padded, the padding
        masked out (FastV ranks every row's image tokens alike)."""
        if int(settings.get("num_beams") or 1) > 1:
            raise NotImplementedError("minifastv does not do beam search (num_beams > 1).")
        temperature = float(settings.get("temperature") or 0)
        sampling = Sampling(temperature, float(settings.get("top_p") or 1)) if temperature else None
        until = settings.get("until") or []
        until = [until] if isinstance(until, str) else until

        prompts = [ids for ids, _ in questions]
        input_ids, attention_mask = left_pad(prompts, self.model.config.pad_token_id)  # (B, T)
        length = input_ids.shape[1]
        images = [image for _, row_images in questions for image in row_images]
        pixel_values = preprocess(images, self.image_config, pad=self.pad) if images else None
        context = self.model.config.text.max_position_embeddings
        max_new_tokens = min(int(settings.get("max_new_tokens", self.max_new_tokens)),
                             context - length)  # no further than the context allows
        new_tokens = generate(self.model, input_ids, pixel_values, attention_mask=attention_mask,
                              max_new_tokens=max_new_tokens, sampling=sampling,
                              fastv=self.fastv if images else None)  # (B, N)
        eos = self.model.config.text.eos_token_id
        answers = [self.tokenizer.decode(row[:row.index(eos)] if eos in row else row)
                   for row in new_tokens.tolist()]
        for stop in until:
            answers = [answer.split(stop)[0] for answer in answers]
        return [answer.strip() for answer in answers]
