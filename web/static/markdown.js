// Model answers as markdown: `marked` turns the text into HTML, `DOMPurify` removes anything that is
// not plain formatting (scripts, handlers, javascript: links, styles, images, forms) before it reaches
// the page, and `highlight.js` colours code blocks (its output is sanitized too). Raw HTML written in
// the text is shown as text, never interpreted. All three libraries are vendored from npm (web/vendor).

import { copyText, h, icon } from "./common.js";

const { marked: markedLib, DOMPurify, hljs } = window;

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
const escapeHtml = (text) => text.replace(/[&<>"']/g, (c) => ESCAPES[c]);

const md = new markedLib.Marked({ gfm: true, breaks: false, async: false });
md.use({
  renderer: {
    // Raw HTML in the markdown (block or inline) is displayed literally.
    html({ text }) {
      return escapeHtml(text);
    },
  },
});

const ALLOWED_TAGS = [
  "p", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6", "strong", "em", "b", "i", "del", "s",
  "code", "pre", "blockquote", "ul", "ol", "li", "a", "table", "thead", "tbody", "tr", "th", "td",
  "span", "sup", "sub", "kbd",
];
const MARKDOWN_POLICY = {
  ALLOWED_TAGS,
  ALLOWED_ATTR: ["href", "title", "class", "start", "align", "colspan", "rowspan"],
  ALLOW_DATA_ATTR: false,
  ALLOW_ARIA_ATTR: false,
  // http(s) and mailto links only: javascript:, data: and the rest are dropped.
  ALLOWED_URI_REGEXP: /^(?:https?:|mailto:)/i,
};
const HIGHLIGHT_POLICY = { ALLOWED_TAGS: ["span"], ALLOWED_ATTR: ["class"] };

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    if (node.hasAttribute("href")) {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer nofollow");
    }
  }
  if (node.hasAttribute("class")) {
    // Only the classes marked and highlight.js write are kept.
    const kept = [...node.classList].filter((c) => /^(language-[\w+#.-]+|hljs(-[\w-]+)?)$/.test(c));
    if (kept.length) node.setAttribute("class", kept.join(" "));
    else node.removeAttribute("class");
  }
});

/** Render `source` (untrusted) as sanitized markdown into `target`. */
export function renderMarkdown(target, source, { final = true } = {}) {
  const html = md.parse(source || "");
  target.innerHTML = DOMPurify.sanitize(html, MARKDOWN_POLICY);
  for (const pre of target.querySelectorAll("pre")) decorateCode(pre, final);
}

function decorateCode(pre, final) {
  const code = pre.querySelector("code");
  if (!code) return;
  const match = /(?:^|\s)language-([\w+#.-]+)/.exec(code.className);
  const language = match ? match[1] : "";
  const text = code.textContent;
  if (final && language && hljs && hljs.getLanguage(language)) {
    const { value } = hljs.highlight(text, { language, ignoreIllegals: true });
    code.innerHTML = DOMPurify.sanitize(value, HIGHLIGHT_POLICY);
    code.classList.add("hljs");
  }
  const button = h("button", { class: "code-copy", type: "button", "aria-label": "Copy code" }, icon("copy"), "Copy");
  button.addEventListener("click", async () => {
    const ok = await copyText(text);
    button.lastChild.textContent = ok ? "Copied" : "Copy failed";
    setTimeout(() => (button.lastChild.textContent = "Copy"), 1500);
  });
  const head = h("div", { class: "code-head" }, h("span", { text: language || "code" }), button);
  const block = h("div", { class: "codeblock" });
  pre.replaceWith(block);
  block.append(head, pre);
}
