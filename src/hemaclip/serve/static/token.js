// Shared by both pages: with `hemaclip serve --token`, a page is opened as /?token=... and every request
// it makes carries the token (?token= on URLs, images included). /static/ files are served without it.
"use strict";

const TOKEN = new URLSearchParams(location.search).get("token");
function withToken(url) { return TOKEN ? `${url}${url.includes("?") ? "&" : "?"}token=${encodeURIComponent(TOKEN)}` : url; }
