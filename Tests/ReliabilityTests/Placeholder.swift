import XCTest
final class PlaceholderR: XCTestCase { func testPlaceholder() {} }
