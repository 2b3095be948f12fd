"""A pymarkdown rule (SPC001, stray-table-row): a paragraph line that starts with ``|``.

GitHub renders such a line as text with its pipes showing: a table whose separator row
(``| --- |``) is missing or has another cell count than its header, or a row cut off from its
table by a blank line.  pymarkdown's own table rules (md055, md056) only see rows that did
become a table, so this rule covers the rest.  Loaded by tests/unit/test_docs.py with
``pymarkdown --add-plugin``; from the repository root, by hand::

    pymarkdown --config tests/unit/markdown/pymarkdown.json \\
        --add-plugin tests/unit/markdown/stray_table_row.py scan README.md CONTRIBUTING.md docs
"""
import re

from pymarkdown.plugin_manager.plugin_details import PluginDetailsV2
from pymarkdown.plugin_manager.rule_plugin import RulePlugin

_PIPE_LINE = re.compile(r"(?:^|\n)[ \t]*\|")


class StrayTableRow(RulePlugin):
    """Reports the first ``|`` line of each paragraph (a table would not be a paragraph)."""

    def __init__(self):
        super().__init__()
        self._paragraph = None  # the open paragraph, until reported or closed
        self._first = False  # the next text token starts the paragraph's first line

    def get_details(self):
        return PluginDetailsV2(plugin_name="stray-table-row", plugin_id="SPC001", plugin_enabled_by_default=False,
                               plugin_description="A line starting with '|' that is not a table row",
                               plugin_version="0.1.0", plugin_url="")

    def next_token(self, context, token):
        if token.is_paragraph:
            self._paragraph, self._first = token, True
            return
        if token.is_paragraph_end:
            self._paragraph = None
            return
        if self._paragraph is None:
            return
        if token.is_text:
            lines = _PIPE_LINE.finditer(token.token_text)
            match = next((m for m in lines if self._first or m.group().startswith("\n")), None)
            if match is not None:
                self._paragraph = None
                self.report_next_token_error(
                    context, token, "a line starting with '|' that renders as text: give the table a header and a "
                    "separator row (---) with the same number of cells, and no blank line inside it",
                    line_number_delta=token.token_text.count("\n", 0, match.end()))
        self._first = False
