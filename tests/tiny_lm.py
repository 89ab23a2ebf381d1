"""A tiny GPT-2 that has learned something, saved in the Hugging Face format with its
tokenizer, for the end-to-end tests (no downloads; a few seconds on CPU).

The text is counting in words ("alpha bravo charlie ...", wrapping, from a random start), so a
trained model predicts the next word almost surely; zero-ablating its residual stream then
costs a lot, which makes the loss-recovered numbers meaningful.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from saejax import evals, models

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliett kilo lima mike "
         "november oscar papa quebec romeo sierra tango").split()
CONTEXT = 32


def write_texts(path, n_documents, seed=0):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n_documents):
            start, length = rng.integers(len(WORDS)), rng.integers(20, 60)
            f.write(" ".join(WORDS[(start + i) % len(WORDS)] for i in range(length)) + "\n")
    return str(path)


def write_tokenizer(directory):
    import tokenizers  # pylint: disable=import-outside-toplevel
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=128,
                                             special_tokens=["<|endoftext|>", "<unk>"])
    tokenizer.train_from_iterator([" ".join(WORDS)] * 4, trainer)
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    return tokenizer


def make_tiny_lm(directory, *, steps=300, n_documents=600):
    """Writes DIR/model (config.json, model.safetensors, tokenizer.json) and DIR/text.txt;
    returns (checkpoint_dir, text_path)."""
    checkpoint = os.path.join(directory, "model")
    os.makedirs(checkpoint, exist_ok=True)
    tokenizer = write_tokenizer(checkpoint)
    text = write_texts(os.path.join(directory, "text.txt"), n_documents)
    with open(text) as f:
        sequences = models.tokenize_texts(tokenizer, [line.strip() for line in f], CONTEXT)
    config = models.GPT2Config(vocab_size=tokenizer.get_vocab_size(), n_positions=64,
                               n_embd=64, n_layer=2, n_head=4)
    params = models.init_params(jax.random.PRNGKey(0), config)
    tx = optax.adam(3e-3)

    @jax.jit
    def step(params, opt_state, tokens):
        def loss_fn(p):
            logits, _ = models.forward(p, tokens, config)
            return jnp.mean(evals.next_token_losses(logits, tokens))
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    rng = np.random.default_rng(0)
    loss = float("nan")  # steps=0: the untrained model
    for _ in range(steps):
        batch = sequences[rng.integers(len(sequences), size=16)]
        params, opt_state, loss = step(params, opt_state, batch)
    models.save_pretrained(checkpoint, config, jax.device_get(params))
    return checkpoint, text, float(loss)


if __name__ == "__main__":
    # python tests/tiny_lm.py DIR: the tiny checkpoint and text, to try the pipeline offline.
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    checkpoint_dir, text_path, final_loss = make_tiny_lm(sys.argv[1])
    print(f"checkpoint: {checkpoint_dir}\ntext: {text_path}\n"
          f"(trained to a next-token loss of {final_loss:.3f} nats)")
