"""Any vision-language chat model on the cytomorphology LVLM protocols: prompts and answer readers
(:mod:`.protocols`), the OpenAI-compatible client (:mod:`.client`), the answer cache (:mod:`.cache`),
the run (:mod:`.runner`) and a scripted test server (:mod:`.scripted`). Scoring and the report are
:mod:`hemaclip_research.lvlm`."""

# The largest chat answer body the client accepts (ClientSettings.max_response_bytes, `lvlm run --max-response-mb`):
# an answer is kilobytes; 8 MiB leaves room for verbose servers. Here so the command line reads it without httpx.
MAX_RESPONSE_BYTES = 8 * 1024 * 1024
