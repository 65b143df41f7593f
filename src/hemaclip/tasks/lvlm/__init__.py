"""Any vision-language chat model on the cytomorphology LVLM protocols: prompts and answer readers
(:mod:`.protocols`), the OpenAI-compatible client (:mod:`.client`), the answer cache (:mod:`.cache`),
the run (:mod:`.runner`) and a scripted test server (:mod:`.scripted`). Scoring and the report are
:mod:`hemaclip.studies.lvlm`."""
