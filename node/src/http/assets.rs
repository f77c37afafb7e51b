//! Static assets: files from `assets_dir` (read from disk on every request, so a kubelet
//! ConfigMap `..data` swap is served at once), falling back to the web page built into the binary.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use warp::http::{Response, StatusCode, header};

/// The built-in web chat page.
const BUILTIN: &[(&str, &[u8])] = &[
    ("index.html", include_bytes!("../../web/index.html")),
    ("app.js", include_bytes!("../../web/app.js")),
    ("chatcluster.js", include_bytes!("../../web/chatcluster.js")),
    ("style.css", include_bytes!("../../web/style.css")),
    ("logo.svg", include_bytes!("../../web/logo.svg")),
];

#[derive(Debug, Clone)]
pub struct Assets {
    dir: Option<PathBuf>,
}

fn content_type(path: &str) -> &'static str {
    match Path::new(path).extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" | "htm" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "ico" => "image/x-icon",
        "json" => "application/json",
        "txt" => "text/plain; charset=utf-8",
        "woff2" => "font/woff2",
        _ => "application/octet-stream",
    }
}

/// A request path made safe to join onto the assets directory, or `None`. Dot-segments are
/// refused too, which keeps the kubelet's `..data` folders and any dotfile private.
fn safe_relative(path: &str) -> Option<&str> {
    let path = if path.is_empty() { "index.html" } else { path };
    let ok = path.split('/').all(|seg| !seg.is_empty() && !seg.starts_with('.') && !seg.contains('\\'));
    ok.then_some(path)
}

impl Assets {
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self { dir }
    }

    /// Looks the file up in the directory first, then in the built-in page.
    pub async fn load(&self, path: &str) -> Option<(Bytes, &'static str)> {
        let path = safe_relative(path)?;
        if let Some(dir) = &self.dir {
            // `read` follows the ConfigMap symlinks, so the current `..data` target is served.
            if let Ok(bytes) = tokio::fs::read(dir.join(path)).await {
                return Some((Bytes::from(bytes), content_type(path)));
            }
        }
        BUILTIN.iter().find(|(name, _)| *name == path).map(|(_, body)| (Bytes::from_static(body), content_type(path)))
    }

    pub async fn response(&self, path: &str) -> Response<Bytes> {
        let builder = Response::builder().header(header::CACHE_CONTROL, "no-cache");
        let response = match self.load(path).await {
            Some((body, kind)) => builder.header(header::CONTENT_TYPE, kind).body(body),
            None => builder
                .status(StatusCode::NOT_FOUND)
                .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
                .body(Bytes::from_static(b"not found\n")),
        };
        response.unwrap_or_else(|_| Response::new(Bytes::new()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_traversal_and_dotfiles() {
        assert_eq!(safe_relative(""), Some("index.html"));
        assert_eq!(safe_relative("img/logo.png"), Some("img/logo.png"));
        for bad in ["../etc/passwd", "..data/logo.svg", "a//b", ".env", "a\\b"] {
            assert_eq!(safe_relative(bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn directory_overrides_builtin_and_follows_configmap_swaps() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        // The kubelet's layout: logo.svg -> ..data/logo.svg, ..data -> ..<timestamp>
        std::fs::create_dir(root.join("..v1")).unwrap();
        std::fs::write(root.join("..v1/logo.svg"), "<svg>v1</svg>").unwrap();
        std::os::unix::fs::symlink("..v1", root.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/logo.svg", root.join("logo.svg")).unwrap();
        let assets = Assets::new(Some(root.to_path_buf()));
        assert_eq!(assets.load("logo.svg").await.unwrap().0, "<svg>v1</svg>");

        std::fs::create_dir(root.join("..v2")).unwrap();
        std::fs::write(root.join("..v2/logo.svg"), "<svg>v2</svg>").unwrap();
        std::os::unix::fs::symlink("..v2", root.join("..data_tmp")).unwrap();
        std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
        assert_eq!(assets.load("logo.svg").await.unwrap().0, "<svg>v2</svg>");

        let (page, kind) = assets.load("").await.unwrap();
        assert!(kind.starts_with("text/html"));
        assert!(!page.is_empty(), "built-in index.html is served when the directory lacks it");
        assert!(assets.load("..data/logo.svg").await.is_none());
        assert!(assets.load("missing.txt").await.is_none());
    }
}
