"""What both pages (the report and the latent view) put into their one HTML file."""

import json


def json_for_script(obj) -> str:
    """JSON safe inside a <script> element: no '<', '>' or '&' can close or open anything.
    NaN and inf are refused (JSON.parse would refuse them too)."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def inline_script(code: str) -> str:
    """Code safe inside <script>: a `</script` in it (in a string or comment) would end the tag."""
    return code.replace("</script", "<\\/script").replace("</SCRIPT", "<\\/SCRIPT")


def plotly_script() -> str:
    """plotly.js itself, inline: the pages open with no network."""
    from plotly.offline import get_plotlyjs

    return f"<script>{inline_script(get_plotlyjs())}</script>"
