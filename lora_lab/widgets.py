"""Widgets: an interactive memory calculator over ``lora_lab.estimate`` (needs ipywidgets)."""

from lora_lab.estimate import CONVENTIONS, METHODS, OPTIMIZERS, PRECISIONS, estimate_memory
from lora_lab.specs import PRESETS
from lora_lab.validate import choice


def memory_calculator(model="llama-2-7b", method="lora", precision="bf16", optimizer="adamw"):
    """An ipywidgets calculator: pick a preset and settings, read the breakdown table.

    Returns a VBox; ``box.controls`` maps each setting to its widget and ``box.output`` is
    the HTML widget that shows the table (updated on every change, no kernel needed).
    """
    import ipywidgets as w

    for name, value, valid in (
        ("model", model, PRESETS),
        ("method", method, METHODS),
        ("precision", precision, PRECISIONS),
        ("optimizer", optimizer, OPTIMIZERS),
    ):
        choice(name, value, valid)
    style = {"description_width": "110px"}
    controls = {
        "model": w.Dropdown(options=list(PRESETS), value=model, description="model"),
        "method": w.Dropdown(options=METHODS, value=method, description="method"),
        "precision": w.Dropdown(options=list(PRECISIONS), value=precision, description="precision"),
        "optimizer": w.Dropdown(options=OPTIMIZERS, value=optimizer, description="optimizer"),
        "convention": w.Dropdown(options=CONVENTIONS, value="mixed", description="convention"),
        "rank": w.IntSlider(value=8, min=1, max=256, description="LoRA rank"),
        "batch_size": w.IntSlider(value=1, min=1, max=64, description="batch size"),
        "seq_len": w.IntSlider(value=512, min=16, max=8192, step=16, description="seq_len"),
    }
    for c in controls.values():
        c.style = style
    output = w.HTML()

    def update(_=None):
        v = {k: c.value for k, c in controls.items()}
        controls["rank"].disabled = v["method"] == "full"
        seq_len = min(v["seq_len"], PRESETS[v["model"]].max_positions)
        kw = {} if v["method"] == "full" else {"rank": v["rank"]}
        try:
            est = estimate_memory(
                v["model"],
                v["method"],
                precision=v["precision"],
                optimizer=v["optimizer"],
                batch_size=v["batch_size"],
                seq_len=seq_len,
                convention=v["convention"],
                **kw,
            )
        except ValueError as err:  # e.g. a rank larger than a layer allows
            output.value = f"<pre>{err}</pre>"
            return
        note = f" (seq_len capped at {seq_len})" if seq_len != v["seq_len"] else ""
        output.value = (
            f"<b>{est.model}</b>: {est.trainable_parameters:,} of {est.num_parameters:,} "
            f"parameters train{note}. GB = 10<sup>9</sup> bytes.{est._repr_html_()}"
        )

    for c in controls.values():
        c.observe(update, names="value")
    update()
    box = w.VBox(
        [w.HBox([w.VBox(list(controls.values())[:5]), w.VBox(list(controls.values())[5:])]), output]
    )
    box.controls, box.output = controls, output
    return box


__all__ = ["memory_calculator"]
