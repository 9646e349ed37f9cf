//! Any request line, query string and body against the two HTTP surfaces as
//! pxed serves them: the boot listener (boot files beneath the boot root,
//! iPXE scripts, the installer's `provisioned` call, with the boot timeline
//! observing) and the operator API (with and without its token, every
//! method). Nothing may panic and nothing may answer 500: bad input is the
//! client's error, said in a 4xx. No file outside the boot root is served.
#![no_main]

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, OnceLock},
};

use axum::{body::Body, extract::ConnectInfo, http::Request, Router};
use libfuzzer_sys::fuzz_target;
use pxe_user::{
    api,
    bootroot::BootRoot,
    control::{Control, Paths},
    http,
    inventory::{Inventory, MemInventoryStore},
    observe::Observer,
    policy::{
        r#static::{Profile, StaticPolicy},
        ServerUrls, SharedPolicy,
    },
};
use tower::ServiceExt as _;

const TOKEN: &str = "fuzz-token";
/// A file beside the boot root: a request that reaches it escaped.
const OUTSIDE: &[u8] = b"outside the boot root";

struct World {
    _dir: tempfile::TempDir,
    root: Arc<BootRoot>,
    runtime: tokio::runtime::Runtime,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("images")).unwrap();
        std::fs::write(root.join("ipxe.efi"), b"boot program").unwrap();
        std::fs::write(root.join("images/vmlinuz"), b"kernel").unwrap();
        std::fs::write(dir.path().join("secret"), OUTSIDE).unwrap();
        std::os::unix::fs::symlink("../secret", root.join("escape")).unwrap();
        World {
            root: Arc::new(BootRoot::open(&root).unwrap()),
            _dir: dir,
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        }
    })
}

/// A fresh server for every input, so one input's changes never reach the next.
fn routers(world: &World) -> (Router, Router) {
    let file = StaticPolicy {
        profiles: [("default".to_owned(), Profile::named("default"))].into(),
        machines: HashMap::new(),
        default_profile: Some("default".into()),
        provision: None,
        classes: Vec::new(),
    };
    let policy = SharedPolicy::new(file.clone());
    let observer = Arc::new(Observer::new(64, 1 << 20));
    let inventory = Inventory::load(Box::new(MemInventoryStore::default())).unwrap();
    let control = Arc::new(Control::new(
        file,
        None,
        inventory,
        Paths {
            policy: policy.clone(),
            engine: None,
            answers: None,
            provision: Some(pxe_user::policy::provision::ProvisionKey::from_secret(TOKEN.as_bytes())),
            webhook: None,
            observer: Arc::clone(&observer),
            cluster: None,
        },
    ));
    let boot = http::router(http::HttpState {
        root: Arc::clone(&world.root),
        policy,
        urls: Arc::new(ServerUrls::new(Ipv4Addr::new(198, 18, 0, 1), 80)),
        gate: Some(Arc::clone(&control) as Arc<dyn pxe_user::policy::FileGate>),
    })
    .merge(api::boot_network_router(Arc::clone(&control)));
    let boot = http::observed(boot, Arc::clone(&observer));
    let operator = api::router(api::ApiState {
        control,
        token: TOKEN.into(),
        attached: Arc::new([]),
        observer,
        metrics_public: false,
    });
    (boot, operator)
}

const METHODS: &[&str] = &["GET", "HEAD", "PUT", "PATCH", "POST", "DELETE"];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    let (line, body) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let method = METHODS[usize::from(selector >> 4) % METHODS.len()];
    let mut request = Request::builder().method(method).uri(line);
    if selector & 2 != 0 {
        request = request.header("authorization", format!("Bearer {TOKEN}"));
    }
    if selector & 4 != 0 {
        request = request.header("content-type", "application/json");
    }
    let Ok(mut request) = request.body(Body::from(body.to_vec())) else { return };
    request
        .extensions_mut()
        .insert(ConnectInfo(SocketAddr::from(([198, 18, 0, 100], 40000))));

    let world = world();
    let (boot, operator) = routers(world);
    let to_boot = selector & 1 == 0;
    let router = if to_boot { boot } else { operator };
    // An answer may echo the request (an API error naming a bad field): the
    // marker only means an escape when the request did not carry it itself.
    let carries_marker = rest.windows(OUTSIDE.len()).any(|w| w == OUTSIDE);
    world.runtime.block_on(async {
        let response = router.oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 24).await.unwrap();
        assert!(
            !status.is_server_error(),
            "{method} {:?} answered {status}: {}",
            String::from_utf8_lossy(line),
            String::from_utf8_lossy(&bytes)
        );
        assert!(
            !to_boot || carries_marker || bytes.windows(OUTSIDE.len()).all(|w| w != OUTSIDE),
            "{method} {:?} served a file outside the boot root",
            String::from_utf8_lossy(line)
        );
    });
});
