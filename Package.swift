// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "UffdKit",
    products: [
        .library(name: "UffdKit", targets: ["UffdKit"]),
        .library(name: "CUffd", targets: ["CUffd"]),
        .library(name: "CUffdNet", targets: ["CUffdNet"]),
        .executable(name: "uffdctl", targets: ["uffdctl"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-system", from: "1.8.1"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.2.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        // `make docs`: the DocC catalog in Sources/UffdKit/UffdKit.docc (build-time plugin only).
        .package(url: "https://github.com/swiftlang/swift-docc-plugin", from: "1.5.0"),
    ],
    targets: [
        // The kernel-facing core: one C function per userfaultfd verb, the fault loop, and the
        // compat header for uABI newer than the installed headers.
        .target(
            name: "CUffd",
            cSettings: [.define("_GNU_SOURCE")]
        ),
        // Remote and packed page sources: libcurl (multi interface on its own thread, SigV4),
        // zstd frames, the chunk cache. Debian: libcurl4-openssl-dev, libzstd-dev (`make deps`).
        .target(
            name: "CUffdNet",
            cSettings: [.define("_GNU_SOURCE")],
            linkerSettings: [.linkedLibrary("curl"), .linkedLibrary("zstd")]
        ),
        // What a Swift user imports: typed API, policies, page sources, handler runtime.
        .target(
            name: "UffdKit",
            dependencies: [
                "CUffd",
                "CUffdNet",
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "Histogram", package: "hdrhistogram-swift"),
            ]
        ),
        // Benchmark kernels in C: baselines and minimal hand-written handlers (the kernel's limit).
        .target(
            name: "CUffdBench",
            dependencies: ["CUffd"],
            cSettings: [.define("_GNU_SOURCE")]
        ),
        // The benchmark suite shared by `uffdctl bench` and `make bench`.
        .target(
            name: "UffdBench",
            dependencies: ["UffdKit", "CUffd", "CUffdBench"]
        ),
        .executableTarget(
            name: "uffdctl",
            dependencies: [
                "UffdKit",
                "UffdBench",
                "CUffd",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // C-level tests of the core, written in C and called from XCTest.
        .target(
            name: "CUffdTestSupport",
            dependencies: ["CUffd"],
            path: "Tests/CUffdTestSupport",
            cSettings: [.define("_GNU_SOURCE")]
        ),
        .testTarget(
            name: "CUffdTests",
            dependencies: ["CUffd", "CUffdTestSupport"]
        ),
        // Real servers on loopback (nginx, moto's S3, a misbehaving HTTP server) started by the
        // remote-source tests of UffdKitTests and uffdctlTests.
        .target(
            name: "TestServers",
            path: "Tests/TestServers"
        ),
        .testTarget(
            name: "UffdKitTests",
            dependencies: ["UffdKit", "CUffd", "CUffdNet", "CUffdTestSupport", "TestServers"]
        ),
        // Stress and fault injection through UffdKit.
        .testTarget(
            name: "ReliabilityTests",
            dependencies: ["UffdKit", "CUffd", "CUffdTestSupport"],
            exclude: ["tsan-suppressions.txt"]
        ),
        // End-to-end tests that run the built uffdctl binary.
        .testTarget(
            name: "uffdctlTests",
            dependencies: ["uffdctl", "UffdKit", "CUffdTestSupport", "TestServers"]
        ),
    ]
)
