"""Rule next_line_task: the project's offline multiple-choice items, from held-out text, as JSON lines."""

from _adapter import stage

from lowrank.data import load_corpus_text
from lowrank.zeroshot import next_line_items, write_items


def run(smk) -> None:
    with stage(smk) as st:
        spec = dict(smk.params.task)
        text = load_corpus_text(spec.pop("corpus"))
        items = next_line_items(text, spec["n_items"], spec["context_lines"], spec["n_choices"], spec["seed"],
                                spec["min_chars"], spec["max_chars"])
        st.log.info("%d items with %d choices from %d characters of held-out text", len(items), spec["n_choices"],
                    len(text))
        write_items(smk.output[0], items)


if "snakemake" in globals():
    run(snakemake)
