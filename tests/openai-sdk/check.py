"""What an application using the official `openai` SDK does, against `enclave serve`."""

import os
import sys

import openai

base_url = sys.argv[1]
# The key `run.sh` created (`enclave keys create`), sent as `Authorization: Bearer …`.
client = openai.OpenAI(base_url=base_url, api_key=os.environ["OPENAI_API_KEY"], max_retries=0)

# A wrong key is the SDK's AuthenticationError (HTTP 401), not a crash or a 500.
intruder = openai.OpenAI(base_url=base_url, api_key="enc_" + "0" * 16 + "_" + "0" * 64, max_retries=0)
try:
    intruder.models.list()
    raise SystemExit("a made-up key was accepted")
except openai.AuthenticationError as e:
    assert e.status_code == 401, e

# Models list.
models = client.models.list()
ids = [m.id for m in models.data]
assert ids == ["tiny"], ids

# Chat.
chat = client.chat.completions.create(
    model="tiny",
    messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}],
    max_tokens=8,
    temperature=0,
    extra_body={"ignore_eos": True},
)
assert chat.object == "chat.completion"
assert chat.choices[0].message.role == "assistant"
assert isinstance(chat.choices[0].message.content, str)
assert chat.choices[0].finish_reason == "length"
assert chat.usage.completion_tokens == 8
assert chat.usage.total_tokens == chat.usage.prompt_tokens + 8

# Streaming chat with usage: the same text as the non-streamed reply.
stream = client.chat.completions.create(
    model="tiny",
    messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}],
    max_tokens=8,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
    extra_body={"ignore_eos": True},
)
text, usage, finish = "", None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for choice in chunk.choices:
        text += choice.delta.content or ""
        finish = choice.finish_reason or finish
assert text == chat.choices[0].message.content, (text, chat.choices[0].message.content)
assert finish == "length"
assert usage is not None and usage.completion_tokens == 8

# Completions with echo and logprobs (log-likelihood scoring).
completion = client.completions.create(
    model="tiny", prompt="The cat sat on the", max_tokens=1, echo=True, logprobs=1, temperature=0
)
choice = completion.choices[0]
assert choice.text.startswith("The cat sat on the"), choice.text
lp = choice.logprobs
assert lp.token_logprobs[0] is None
assert all(x <= 0 for x in lp.token_logprobs[1:])
assert len(lp.tokens) == completion.usage.prompt_tokens + 1

# Errors surface as the SDK's typed exceptions.
try:
    client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=-1
    )
    raise AssertionError("negative temperature accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400
    assert e.body["param"] == "temperature", e.body
try:
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    raise AssertionError("unknown model accepted")
except openai.NotFoundError as e:
    assert e.body["code"] == "model_not_found", e.body

print("openai", openai.__version__, "ok")
