//! `openapi.yaml`: served as it is in the repository, parseable, and describing exactly the
//! routes and methods the router knows, and every error code.

use crate::support::TestApp;
use discount_proxy::error::ERROR_CODES;
use discount_proxy::routes::ROUTES;
use serde_yaml_ng::Value;
use std::collections::BTreeSet;

#[tokio::test]
async fn the_served_description_matches_the_router_and_the_error_codes() {
    let app = TestApp::spawn().await;
    let response = app.get("/openapi.yaml").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/yaml");
    let served = response.text().await.unwrap();
    let on_disk =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap();
    assert_eq!(served, on_disk, "the served document is the repository's");

    let spec: Value = serde_yaml_ng::from_str(&served).unwrap();
    assert!(spec["openapi"].as_str().unwrap().starts_with("3."));
    let described: BTreeSet<(String, String)> = spec["paths"]
        .as_mapping()
        .unwrap()
        .iter()
        .flat_map(|(path, operations)| {
            let path = path.as_str().unwrap().to_owned();
            operations
                .as_mapping()
                .unwrap()
                .keys()
                .map(|key| key.as_str().unwrap().to_owned())
                .filter(|key| key != "parameters")
                .map(move |method| (path.clone(), method))
        })
        .collect();
    let routed: BTreeSet<(String, String)> = ROUTES
        .iter()
        .flat_map(|(path, methods)| {
            methods
                .iter()
                .map(|method| ((*path).to_owned(), method.as_str().to_ascii_lowercase()))
        })
        .collect();
    assert_eq!(described, routed, "openapi.yaml and the router disagree");

    let codes: BTreeSet<&str> = spec["components"]["schemas"]["ErrorObject"]["properties"]["code"]
        ["enum"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|code| code.as_str().unwrap())
        .collect();
    assert_eq!(codes, ERROR_CODES.iter().copied().collect());
}

#[tokio::test]
async fn every_route_answers_its_methods_and_refuses_others_with_405() {
    let app = TestApp::spawn().await;
    for (path, methods) in ROUTES {
        let path = path.replace("{sn}", "C1");
        let response = app
            .client
            .request(reqwest::Method::PUT, app.url(&path))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 405, "PUT {path}");
        let allow = response.headers()["allow"].to_str().unwrap().to_owned();
        let listed: Vec<&str> = methods.iter().map(|method| method.as_str()).collect();
        assert_eq!(allow, listed.join(", "), "{path}");
    }
    assert_eq!(app.get("/openapi.yaml").await.status(), 200);
    assert_eq!(app.get("/openapi.json").await.status(), 404);
}
