"""The Batch API backend (`--backend batch`): the same inputs, result lines and sink as the online path.

- `lines.py`   pure: requests → Batch input lines, split into files; output/error lines → result lines
- `state.py`   the `_batches/` records under SINK: which custom_ids each batch covers
- `service.py` the files and batches endpoints through the run's one `AsyncAzureOpenAI` client
- `pipeline.py` one run: collect finished batches, resubmit what expired, submit what is new
- `commands.py` `worker batches [cancel]`

A record is written before its batch is created, and the batch's `metadata` names the sink, the unit and
the part, so a batch whose create answer was lost (a crash, a dropped connection) is adopted by the next
run instead of being submitted twice.
"""
