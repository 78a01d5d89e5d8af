"""What a logged run says about its alarms: the Markdown text every logger shows under
``saliency_alarms/alarms`` (the model's alarms, then the methods' health apart), and the alert
for the loggers that reach people outside the dashboard (W&B).
"""

from __future__ import annotations

from collections.abc import Sequence

from lightning_saliency.callback.failures import FailurePolicy
from lightning_saliency.evaluate.hysteresis import AlarmEvent
from lightning_saliency.evaluate.monitor import ScoreMonitor

ALERT_TITLE = "lightning-saliency: shortcut alarm"


def alarm_text(
    epoch: int,
    events: Sequence[AlarmEvent],
    monitor: ScoreMonitor,
    policy: FailurePolicy,
    news: Sequence[str],
) -> str:
    """The run's alarm text: its alarm changes and the alarms raised now; under "method
    health" (never counted or shown as alarms) the notes, ``news`` and the methods off."""
    lines = [f"- {e.message()}" for e in events if e.kind == "alarm"]
    raised = ", ".join(f"{m} {s}" for m, s in monitor.raised) or "none"
    lines.append(f"- raised now: {raised}")
    health = [f"- {e.message()}" for e in events if e.kind == "note"]
    health += [f"- {n}" for n in news]
    if monitor.noted:
        health.append(f"- noted now: {', '.join(f'{m} {s}' for m, s in monitor.noted)}")
    if policy.switched_off:
        health.append(f"- switched off: {', '.join(policy.switched_off)}")
    if health:  # about the methods, not the model: never counted or shown as alarms
        lines += ["", "**method health**", *health]
    return f"**epoch {epoch}**  \n" + "  \n".join(lines)


def alarm_alert(events: Sequence[AlarmEvent]) -> tuple[str, str] | None:
    """``(title, text)`` of the run's alert: one per logged run that raised an alarm about the
    model or brought one back (``None`` otherwise; a cleared alarm or a method note sends
    none).

    Examples:
        >>> raised = AlarmEvent(0, "gradcam", "consensus", 0.9, 0.82, None, "raised")
        >>> alarm_alert([raised])[1].startswith("saliency alarm at epoch 0: gradcam consensus")
        True
        >>> alarm_alert([AlarmEvent(3, "gradcam", "consensus", 0.1, 0.82, None, "cleared")])
    """
    news = [e.message() for e in events if e.kind == "alarm" and e.state != "cleared"]
    return (ALERT_TITLE, "\n".join(news)) if news else None


__all__ = ["ALERT_TITLE", "alarm_alert", "alarm_text"]
