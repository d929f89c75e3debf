//! The topic half of the data contract: one topic per entity, the record each
//! carries, and the registry subject of its values.

use crate::record::{CompiledSchema, Record};
use crate::records::{Asset, Candle, DeadLetter, Exchange, Market, Price, Rate, Trade};

/// One entity topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Topic {
    Assets,
    Rates,
    Exchanges,
    Markets,
    Prices,
    Trades,
    Candles,
    DeadLetters,
}

impl Topic {
    /// Every topic, in a stable order.
    pub const ALL: [Topic; 8] = [
        Topic::Assets,
        Topic::Rates,
        Topic::Exchanges,
        Topic::Markets,
        Topic::Prices,
        Topic::Trades,
        Topic::Candles,
        Topic::DeadLetters,
    ];

    /// The topic name without prefix.
    pub fn base_name(self) -> &'static str {
        match self {
            Topic::Assets => "assets",
            Topic::Rates => "rates",
            Topic::Exchanges => "exchanges",
            Topic::Markets => "markets",
            Topic::Prices => "prices",
            Topic::Trades => "trades",
            Topic::Candles => "candles",
            Topic::DeadLetters => "dead-letters",
        }
    }

    /// The topic name with the pipeline's prefix (which may be empty), e.g. `dev.trades`.
    pub fn name(self, prefix: &str) -> String {
        format!("{prefix}{}", self.base_name())
    }

    /// The Schema Registry subject of its values (TopicNameStrategy).
    pub fn value_subject(self, prefix: &str) -> String {
        format!("{}-value", self.name(prefix))
    }

    /// The compiled-in schema of its values.
    pub fn schema(self) -> &'static CompiledSchema {
        match self {
            Topic::Assets => Asset::compiled(),
            Topic::Rates => Rate::compiled(),
            Topic::Exchanges => Exchange::compiled(),
            Topic::Markets => Market::compiled(),
            Topic::Prices => Price::compiled(),
            Topic::Trades => Trade::compiled(),
            Topic::Candles => Candle::compiled(),
            Topic::DeadLetters => DeadLetter::compiled(),
        }
    }

    /// The topic for a base name (without prefix).
    pub fn from_base_name(name: &str) -> Option<Topic> {
        Topic::ALL.into_iter().find(|t| t.base_name() == name)
    }
}
