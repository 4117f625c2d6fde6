"""What the report's multi-panel figures share: one legend for all panels, outside the data at the right,
and the caption under the panels with the layout leaving it room."""

from __future__ import annotations

__all__ = ["panel_legend", "place_caption"]


def panel_legend(axes) -> None:
    """One legend at the right of the last panel with every panel's entries, each label once (a method or
    line missing from one panel still gets its entry; a line drawn in every panel gets one)."""
    handles: dict = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    axes[-1].legend(
        handles.values(), handles.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0
    )


def place_caption(fig, caption: str, bottom: float = 0.04, per_line: float = 0.035) -> None:
    """The caption at the figure's bottom left; tight_layout keeps the panels above it (`bottom` for its
    first line, `per_line` for each further one)."""
    if caption:
        fig.text(0.01, 0.01, caption, fontsize=7.5, ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, bottom + per_line * caption.count("\n"), 1, 1))
